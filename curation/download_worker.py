"""What runs inside the img2dataset subprocess (`python -m curation.download`): img2dataset's own sharding, writer,
stats and distributors, with two parts swapped for ours.

- The fetch: img2dataset's `download_image_with_retry` (urllib: file:/data: URLs, any address, no size cap) is
  replaced in each worker by `curation.fetch.fetch` under the build's FetchPolicy. In-run retries (`retries`) repeat
  only transient failures.
- The decode: img2dataset's `Resizer` (cv2.imdecode: ignores EXIF orientation, decodes any pixel count) is replaced by
  `StoredImageResizer`, i.e. `curation.imaging.to_stored_jpeg` (header-checked pixel cap, upright decode, the same
  resize modes), the one encoder every route into a build uses.

- The sample writer (`StagingSampleWriter`): the same staging files as img2dataset's webdataset writer, written
  with our tar writer, plus each stored JPEG's sha256 and pHash (`curation.imagehash`), computed here, in the
  parallel workers, as two more staging parquet columns, so dedup does not read and decode every image again in one
  process after the download.

How: `img2dataset.main.download` looks `Downloader` and `Resizer` up in its module at call time, so the driver swaps
them there. Workers are spawned and receive the Downloader by pickling: `GuardedDownloader` is importable from here,
and it installs the fetch replacement in the worker process the first time it is called.

Only the subprocess imports this module (it imports img2dataset).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import img2dataset.downloader as i2d_downloader
import img2dataset.reader as i2d_reader
import img2dataset.writer as i2d_writer
import pyarrow as pa

from curation import tario
from curation.diskspace import is_disk_full
from curation.download_config import DISK_FULL_SIGNAL, DRIVER_PID_ENV
from curation.fetch import FetchError, FetchPolicy, fetch
from curation.imagehash import STORED_HASH_FIELDS, stored_hashes
from curation.imaging import ImageRejected, ImageSpec, to_stored_jpeg

# `img2dataset.main` the attribute is the CLI function (the package re-exports it); the module is what we patch.
i2d_main = importlib.import_module("img2dataset.main")

# The img2dataset this module was written against: it replaces `download_image_with_retry` and subclasses
# `Downloader`, so another version (upstream master already added a parameter) would fail every shard. Pinned in
# pyproject.toml and requirements.lock.txt; checked when the download starts.
SUPPORTED_IMG2DATASET = "1.47.0"
REPLACED_SIGNATURES = {
    "img2dataset.downloader.download_image_with_retry": (
        "row", "timeout", "retries", "user_agent_token", "disallowed_header_directives"),
    "img2dataset.downloader.Downloader.__init__": (
        "self", "sample_writer_class", "resizer", "thread_count", "save_caption", "extract_exif", "output_folder",
        "column_list", "timeout", "number_sample_per_shard", "oom_shard_count", "compute_hash", "verify_hash_type",
        "encode_format", "retries", "user_agent_token", "disallowed_header_directives", "blurring_bbox_col"),
    "img2dataset.writer.WebDatasetSampleWriter.__init__": (
        "self", "shard_id", "output_folder", "save_caption", "oom_shard_count", "schema", "encode_format"),
    "img2dataset.reader.Reader.__init__": (
        "self", "url_list", "input_format", "url_col", "caption_col", "verify_hash_col", "verify_hash_type",
        "save_additional_columns", "number_sample_per_shard", "done_shards", "tmp_path", "start_shard_id"),
}


class UnsupportedImg2dataset(RuntimeError):
    """The installed img2dataset is not the one the guarded download replaces parts of."""


def check_supported_img2dataset() -> None:
    """Raise UnsupportedImg2dataset (one line naming the supported version) unless the installed img2dataset is the
    supported version and the functions the download replaces or subclasses have the signatures it was written for."""
    installed = importlib.metadata.version("img2dataset")
    targets = {"img2dataset.downloader.download_image_with_retry": i2d_downloader.download_image_with_retry,
               "img2dataset.downloader.Downloader.__init__": i2d_downloader.Downloader.__init__,
               "img2dataset.writer.WebDatasetSampleWriter.__init__": i2d_writer.WebDatasetSampleWriter.__init__,
               "img2dataset.reader.Reader.__init__": i2d_reader.Reader.__init__}
    changed = [name for name, fn in targets.items()
               if tuple(inspect.signature(fn).parameters) != REPLACED_SIGNATURES[name]]
    if installed != SUPPORTED_IMG2DATASET or changed:
        what = f"img2dataset {installed} is installed" + (f" and {', '.join(changed)} changed signature"
                                                          if changed else "")
        raise UnsupportedImg2dataset(f"cc4m's download supports img2dataset=={SUPPORTED_IMG2DATASET} only ({what}); "
                                     f"install it: pip install img2dataset=={SUPPORTED_IMG2DATASET}")


def guarded_download_with_retry(row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None,
                                disallowed_header_directives: Any, *, policy: FetchPolicy
                                ) -> tuple[int, IO[bytes] | None, str | None]:
    """img2dataset's `download_image_with_retry` contract: (key, body or None, error message or None)."""
    key, url = row
    error: FetchError | None = None
    for _ in range(retries + 1):
        try:
            return key, fetch(url, policy), None
        except FetchError as err:
            error = err
            if not err.transient:  # a 404 or a blocked address will not change in the next second
                break
    return key, None, str(error)


@contextlib.contextmanager
def stop_the_download_on_a_full_disk() -> Iterator[None]:
    """A write that fails with ENOSPC/EDQUOT signals the driver, which exits at once (curation.download_driver):
    img2dataset catches a sample's write error, prints it and goes on with the next sample and the next shard."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err) and os.environ.get(DRIVER_PID_ENV):
            os.kill(int(os.environ[DRIVER_PID_ENV]), DISK_FULL_SIGNAL)
        raise


class StagingSampleWriter:
    """img2dataset's webdataset sample writer (its contract and its files: `<shard>.tar` with `<key>.jpg/.json/.txt`
    members in webdataset's order, `<shard>.parquet` with every row's meta), leaner and hashing:
    - the tar is written by `curation.tario.ShardWriter` (plain USTAR headers, mtime 0) instead of webdataset's
      TarWriter and its per-member PAX header, and the .json member is compact: about 0.2 ms less per image;
    - each row gets the stored image's hashes (`STORED_HASH_FIELDS`), computed here, in the parallel workers."""

    def __init__(self, shard_id: int, output_folder: str, save_caption: bool, oom_shard_count: int,
                 schema: pa.Schema, encode_format: str) -> None:
        for field in STORED_HASH_FIELDS:
            schema = schema.append(field)
        name = f"{shard_id:0{oom_shard_count}d}"
        self.encode_format, self.save_caption = encode_format, save_caption
        self.tar_file = open(Path(output_folder) / f"{name}.tar", "wb")  # noqa: SIM115 - closed in close()
        self.tar = tario.ShardWriter(self.tar_file)
        self.parquet = i2d_writer.BufferedParquetWriter(f"{output_folder}/{name}.parquet", schema, 100)

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        with stop_the_download_on_a_full_disk():
            self._write(img_str, key, caption, meta)

    def _write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        sha, phash = stored_hashes(img_str) if img_str is not None else (None, None)
        meta = {**meta, "stored_sha256": sha, "stored_phash": phash}
        if img_str is not None:
            members = {self.encode_format: img_str, "json": json.dumps(meta).encode("utf-8")}
            if self.save_caption:
                members["txt"] = ("" if caption is None else str(caption)).encode("utf-8")
            for ext in sorted(members):
                self.tar.add(f"{key}.{ext}", members[ext])
        self.parquet.write(meta)

    def close(self) -> None:
        with stop_the_download_on_a_full_disk():
            self._close()

    def _close(self) -> None:
        self.parquet.close()
        self.tar.close()
        self.tar_file.close()


class GuardedDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader whose worker fetches go through the guarded fetcher, and whose writer hashes."""

    def __init__(self, *args: Any, policy: FetchPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.sample_writer_class is not i2d_writer.WebDatasetSampleWriter:
            raise ValueError(f"the download stage writes webdataset staging shards, not {self.sample_writer_class}")
        self.sample_writer_class = StagingSampleWriter
        directives = tuple(sorted(self.disallowed_header_directives or ()))
        self.policy = replace(policy, user_agent_token=self.user_agent_token,
                              disallowed_header_directives=directives)

    def download_shard(self, row: Any) -> Any:
        """img2dataset's, except that a full disk stops the whole download at once: img2dataset would print the
        error, retry the shard and go on to the next one, each failing the same way."""
        with stop_the_download_on_a_full_disk():
            return super().download_shard(row)

    def __call__(self, row: Any) -> Any:
        # download_shard calls the module-level name: point it at ours (per process, idempotent).
        i2d_downloader.download_image_with_retry = functools.partial(guarded_download_with_retry, policy=self.policy)
        return super().__call__(row)


@dataclass(frozen=True)
class StoredImageResizer:
    """img2dataset's Resizer contract: (img_bytes, width, height, original_width, original_height, error)."""

    spec: ImageSpec
    min_image_size: int = 0
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")

    def __call__(self, img_stream: IO[bytes], blurring_bbox_list: Any = None) -> tuple:
        if blurring_bbox_list is not None:
            return None, None, None, None, None, "other: bounding-box blurring is not supported"
        img_stream.seek(0)
        try:
            stored = to_stored_jpeg(img_stream.read(), self.spec)
        except ImageRejected as err:
            return None, None, None, None, None, f"{err.reason}: {err.detail}"
        w, h = stored.original_width, stored.original_height
        if min(w, h) < self.min_image_size:
            return None, None, None, None, None, f"image_too_small: {w}x{h} < {self.min_image_size}"
        if w * h > self.max_image_area:
            return None, None, None, None, None, f"image_area_too_large: {w}x{h} > {self.max_image_area}"
        if max(w, h) / min(w, h) > self.max_aspect_ratio:
            return None, None, None, None, None, f"aspect_ratio_too_large: {w}x{h} > {self.max_aspect_ratio}"
        return stored.jpeg, stored.width, stored.height, w, h, None


def make_resizer(max_pixels: int, image_size: int, resize_mode: str, encode_quality: int = 95,
                 min_image_size: int = 0, max_image_area: float = float("inf"),
                 max_aspect_ratio: float = float("inf"), **_ignored: Any) -> StoredImageResizer:
    """Built from the keyword arguments img2dataset.main.download passes to its Resizer. The ones ignored here
    (interpolation, encode format, reencoding switches, blurrer) are refused up front by DownloadConfig."""
    spec = ImageSpec(image_size=image_size, resize_mode=resize_mode, encode_quality=encode_quality,
                     max_pixels=max_pixels)
    return StoredImageResizer(spec, min_image_size, max_image_area, max_aspect_ratio)


def _reader_from(start_shard: int, *args: Any) -> Any:
    """img2dataset's Reader (called positionally by img2dataset.main.download) numbering its shards from
    `start_shard`: a download part's shards get the ids, file names and sample keys a whole-round run gives them."""
    args = list(args)
    args[10] = start_shard  # start_shard_id (img2dataset 1.47.0's Reader signature, checked at start)
    return i2d_reader.Reader(*args)


def run(img2dataset_kwargs: dict[str, Any], policy: FetchPolicy, max_pixels: int, start_shard: int = 0) -> None:
    """img2dataset.download with the guarded fetch and our decoder swapped in; shards numbered from
    `start_shard` (a download part, curation.download_parts)."""
    check_supported_img2dataset()
    if start_shard:
        i2d_main.Reader = functools.partial(_reader_from, start_shard)
    i2d_main.Downloader = functools.partial(GuardedDownloader, policy=policy)
    i2d_main.Resizer = functools.partial(make_resizer, max_pixels)
    i2d_main.download(**img2dataset_kwargs)
