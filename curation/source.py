"""Where a build's samples come from. A source is read twice: `ingest` turns it into ingest/ + rejects/ parts, and
after parse and select, `materialize` puts the selected samples' images into staging/ + downloads.parquet. Both
kinds write the same files, so no other stage knows which kind it has.

    TableSource       a CC12M-layout TSV (url<TAB>caption, .tsv or .tsv.gz) or a parquet with url and caption:
                      ingest reads the rows (curation.ingest), materialize downloads the images (curation.download)
    WebDatasetSource  shards of a crawl already made (curation.wds_source): ingest reads the shards' captions,
                      materialize extracts the selected images from them (nothing is downloaded)

`open_source` is the one place that decides which kind a source string names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from curation.download import DownloadConfig, download_selected
from curation.download_parts import PartRunner
from curation.ingest import IngestConfig, SourceError, ingest_source, source_kind
from curation.progress import ProgressCallback
from curation.wds_source import WebDatasetSource, is_wds_source
from manifests.locations import is_url

__all__ = ["Source", "SourceError", "TableSource", "WebDatasetSource", "open_source"]


class Source(Protocol):
    """One kind of source; `location` is the source as given (a path, a URL or a shard pattern)."""

    location: str

    def check(self) -> None:
        """Raise SourceError unless the source can be read (before anything of the build is written)."""

    def absolute_location(self) -> str:
        """The location with a local path made absolute (a URL as given): what a build run elsewhere can read."""

    def remote_copy(self, build_dir: str | Path) -> Path | None:
        """Where a remote source must be fetched to before it is read, or None when it is read where it is."""

    def ingest(self, build_dir: str | Path, cfg: IngestConfig, progress: ProgressCallback | None = None,
               processes: int = 1) -> dict[str, Any]:
        """The ingest stage: the source -> ingest/ + rejects/ parts; returns the ingest counts."""

    def materialize(self, build_dir: str | Path, cfg: DownloadConfig, progress: ProgressCallback | None = None,
                    parts: PartRunner | None = None) -> dict[str, Any]:
        """The download stage: the selected samples' images -> staging/ + downloads.parquet; returns its counts.
        `parts`: where a download runs its parts (curation.download_parts; Dask workers)."""


def open_source(source: str | Path) -> Source:
    """The Source a string names: webdataset shards (a folder, a .tar, a glob or a brace pattern), else a table."""
    return WebDatasetSource(str(source)) if is_wds_source(source) else TableSource(str(source))


class TableSource:
    """A TSV or parquet file of url + caption rows; its images are downloaded."""

    def __init__(self, source: str) -> None:
        self.location = source

    def check(self) -> None:
        path = Path(self.location)
        if not path.is_file():
            local = " (a TSV/parquet source must be a local file)" if is_url(self.location) else ""
            raise SourceError(f"source {path} does not exist or is not a file{local}. Check the path")
        try:
            with open(path, "rb"):
                pass
            if source_kind(path) == "parquet":
                _check_parquet_columns(path)
        except PermissionError as exc:
            raise SourceError(f"cannot read source {path} (permission denied). Make it readable, or copy it to a "
                              f"place you can read") from exc

    def absolute_location(self) -> str:
        return self.location if is_url(self.location) else str(Path(self.location).resolve())

    def remote_copy(self, build_dir: str | Path) -> Path | None:
        if not is_url(self.location):
            return None
        from urllib.parse import urlparse

        return Path(build_dir) / "source" / (Path(urlparse(self.location).path).name or "source.tsv")

    def ingest(self, build_dir: str | Path, cfg: IngestConfig, progress: ProgressCallback | None = None,
               processes: int = 1) -> dict[str, Any]:
        return ingest_source(self.location, build_dir, cfg)  # one reader; its own progress bar (cfg.progress)

    def materialize(self, build_dir: str | Path, cfg: DownloadConfig, progress: ProgressCallback | None = None,
                    parts: PartRunner | None = None) -> dict[str, Any]:
        return download_selected(build_dir, cfg, progress, parts)


def _check_parquet_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except pa.ArrowInvalid as exc:
        raise SourceError(f"source {path} is named .parquet but is not a readable parquet file ({exc}). Point the "
                          f"source at a complete parquet file, or give a TSV a .tsv/.tsv.gz name") from exc
    missing = sorted({"url", "caption"} - set(names))
    if missing:
        raise SourceError(f"parquet source {path} lacks column(s) {missing} (it has {names}). Give it 'url' and "
                          f"'caption' columns (CC12M layout)")
