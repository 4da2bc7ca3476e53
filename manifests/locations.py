"""Where a file lives: the project's one answer to "is this a URL" and its one way to open a location for reading.

A location is a local path, an http(s) URL or any other fsspec URL (s3://, gs://, memory://, ...). `file://` counts
as a local path. Both sides use these: curation streams webdataset sources, training streams shards.
"""
from __future__ import annotations

import os
import urllib.request
from typing import IO

HTTP_SCHEMES = ("http://", "https://")


def is_url(location: str | os.PathLike, *, http_only: bool = False) -> bool:
    """True for `scheme://...` (only http/https when `http_only`), False for a local path or a file:// URL."""
    text = str(location)
    if http_only:
        return text.startswith(HTTP_SCHEMES)
    return "://" in text and not text.startswith("file://")


def open_location(location: str | os.PathLike, timeout: float = 60.0) -> IO[bytes]:
    """A readable binary stream of a whole file: local path, http(s) (one streamed GET) or an fsspec URL.
    The caller closes it."""
    text = str(location)
    if is_url(text, http_only=True):
        return urllib.request.urlopen(text, timeout=timeout)
    if is_url(text):
        import fsspec  # only for the other URL schemes

        return fsspec.open(text, "rb").open()
    return open(text.removeprefix("file://"), "rb")
