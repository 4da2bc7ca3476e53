"""Ingest a CC12M-layout source (`url<TAB>caption` TSV, optionally gzipped, or a parquet with `url`,`caption`) into
numbered parquet parts with stable sample ids, and every unreadable row into rejects parts with its reason.

Decisions (documented here because downstream stages and the manifest depend on them):
- Lines are read as BYTES and split on b"\\n" ourselves. No CSV reader: pyarrow's would strip a caption's leading
  quote. One trailing b"\\r" is stripped (CRLF files).
- A row is split on its FIRST tab only: a url cannot contain a tab, so any further tab belongs to the caption and is
  KEPT verbatim in it (friendlier than rejecting; CC12M has exactly two columns so this is rare).
- A UTF-8 byte-order mark at the start of the first line is stripped (spreadsheet exports add one).
- A url must be able to be a web address: it needs a scheme (`www.example.com/a.jpg` has none: `no_scheme`) and
  may not contain control characters (C0/C1 such as NUL, a lone CR or U+0085, and the line/paragraph separators
  U+2028/U+2029: `control_characters`). Which schemes are fetched is the download stage's decision (anything but
  http/https fails there as `blocked_scheme`, counted like every other failure).
- url and caption are stripped of surrounding whitespace; the stored caption is the stripped one, so entity
  offsets computed later index the stored caption.
- sample_id = 0-based line (row) number in the source, counting rejected and blank lines, so ids are stable across
  reruns and across `rows_per_part`. Part k holds ids [k*rows_per_part, (k+1)*rows_per_part).
- Every part index gets BOTH an ingest part and a rejects part (possibly empty), rejects first; the ingest part is
  the "part done" signal. `ingest/ingest-done.json` marks the whole source done and pins its sha256: a rerun on the
  same source returns the recorded counts, a rerun on a changed source (or other rows_per_part) is refused.
"""
from __future__ import annotations

import gzip
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import read_json, sha256_file, write_json_atomic, write_parquet_atomic
from curation.layout import BuildLayout, part_name

DONE_MARKER = "ingest-done.json"
STARTED_MARKER = "ingest-started.json"

# Every reason a row can be rejected for; the manifest lists these.
REJECT_REASONS = (
    "bad_utf8",        # the line is not valid UTF-8
    "missing_tab",     # no tab: not url<TAB>caption
    "empty_line",      # a blank line (still counts as a row so later ids do not shift)
    "empty_url",       # url empty after stripping whitespace
    "empty_caption",   # caption empty after stripping whitespace (or null in parquet)
    "url_too_long",    # len(url) > max_url_chars
    "caption_too_long",  # len(caption) > max_caption_chars
    "line_too_long",   # raw line longer than max_line_bytes: not even decoded, to bound memory
    "no_scheme",       # the url has no scheme: it cannot be a web address
    "control_characters",  # the url holds a control character (NUL, lone CR, U+0085, U+2028, ...)
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
BOM = b"\xef\xbb\xbf"


def url_problem(url: str) -> str | None:
    """Why `url` (already stripped) cannot be a web address, or None. The download stage checks the rest."""
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") for ch in url):
        return "control_characters"
    if not _SCHEME.match(url):
        return "no_scheme"
    return None

INGEST_SCHEMA = pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())])
REJECT_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("line", pa.int64()), ("raw", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class IngestConfig:
    rows_per_part: int = 100_000
    max_caption_chars: int = 4_096
    max_url_chars: int = 4_096
    # A line longer than this is skipped in chunks without being held in memory (a corrupt file with no newlines).
    max_line_bytes: int = 1 << 20
    raw_chars_kept: int = 1_000  # rejects keep this much of the raw line
    progress: bool | None = None  # None: show a progress bar only when stderr is a terminal

    def __post_init__(self) -> None:
        for name in ("rows_per_part", "max_caption_chars", "max_url_chars", "max_line_bytes", "raw_chars_kept"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"IngestConfig.{name} must be a positive int, got {value!r}")
        if self.max_line_bytes < self.max_url_chars + self.max_caption_chars:
            raise ValueError("IngestConfig.max_line_bytes must be >= max_url_chars + max_caption_chars")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Row:
    sample_id: int
    url: str | None = None
    caption: str | None = None
    reason: str | None = None
    raw: str | None = None


def source_kind(source: str | Path) -> str:
    name = str(source).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tsv.gz", ".txt.gz", ".gz")):
        return "tsv.gz"
    return "tsv"


def _open_bytes(path: Path) -> BinaryIO:
    if source_kind(path) == "tsv.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def _check_row(sample_id: int, url: str, caption: str, cfg: IngestConfig, raw: str) -> _Row:
    # Controls are looked for before stripping: str.strip() would silently eat a trailing CR, U+0085 or U+2028.
    problem = url_problem(url.strip(" "))
    url, caption = url.strip(), caption.strip()
    reason = None
    if not url:
        reason = "empty_url"
    elif not caption:
        reason = "empty_caption"
    elif len(url) > cfg.max_url_chars:
        reason = "url_too_long"
    elif problem:
        reason = problem
    elif len(caption) > cfg.max_caption_chars:
        reason = "caption_too_long"
    if reason:
        return _Row(sample_id, reason=reason, raw=raw[: cfg.raw_chars_kept])
    return _Row(sample_id, url=url, caption=caption)


def _tsv_rows(path: Path, cfg: IngestConfig, progress: Any) -> Iterator[_Row]:
    with _open_bytes(path) as fh:
        sample_id = 0
        while True:
            line = fh.readline(cfg.max_line_bytes + 1)
            if not line:
                return
            progress.update(len(line))
            if len(line) > cfg.max_line_bytes and not line.endswith(b"\n"):
                head = line[: cfg.raw_chars_kept * 4]
                while line and not line.endswith(b"\n"):  # skip the rest of the monster line in bounded chunks
                    line = fh.readline(cfg.max_line_bytes)
                    progress.update(len(line))
                raw = head.decode("utf-8", errors="replace")[: cfg.raw_chars_kept]
                yield _Row(sample_id, reason="line_too_long", raw=raw)
                sample_id += 1
                continue
            if sample_id == 0 and line.startswith(BOM):
                line = line[len(BOM):]
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raw = line[: cfg.raw_chars_kept * 4].decode("utf-8", errors="replace")[: cfg.raw_chars_kept]
                yield _Row(sample_id, reason="bad_utf8", raw=raw)
                sample_id += 1
                continue
            if not text.strip():
                yield _Row(sample_id, reason="empty_line", raw=text[: cfg.raw_chars_kept])
            elif "\t" not in text:
                yield _Row(sample_id, reason="missing_tab", raw=text[: cfg.raw_chars_kept])
            else:
                url, caption = text.split("\t", 1)
                yield _check_row(sample_id, url, caption, cfg, text)
            sample_id += 1


def _parquet_rows(path: Path, cfg: IngestConfig, progress: Any) -> Iterator[_Row]:
    pf = pq.ParquetFile(path)
    missing = {"url", "caption"} - set(pf.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: parquet source lacks column(s) {sorted(missing)} (needs 'url' and 'caption')")
    sample_id = 0
    for batch in pf.iter_batches(batch_size=65_536, columns=["url", "caption"]):
        urls = batch.column("url").cast(pa.string()).to_pylist()
        captions = batch.column("caption").cast(pa.string()).to_pylist()
        progress.update(len(urls))
        for url, caption in zip(urls, captions):
            raw = f"{url}\t{caption}"
            yield _check_row(sample_id, url or "", caption or "", cfg, raw)
            sample_id += 1


def _progress_bar(cfg: IngestConfig, total: int, unit: str) -> Any:
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a bar is a convenience, never a requirement
        show = False
    if not show:
        return _NoProgress()
    return tqdm(total=total, unit=unit, unit_scale=True, desc="ingest", file=sys.stderr)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _write_part(layout: BuildLayout, index: int, rows: list[_Row]) -> None:
    ok = [r for r in rows if r.reason is None]
    bad = [r for r in rows if r.reason is not None]
    rejects = pa.table(
        {
            "sample_id": pa.array([r.sample_id for r in bad], pa.int64()),
            "line": pa.array([r.sample_id + 1 for r in bad], pa.int64()),
            "raw": pa.array([r.raw for r in bad], pa.string()),
            "reason": pa.array([r.reason for r in bad], pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    ingested = pa.table(
        {
            "sample_id": pa.array([r.sample_id for r in ok], pa.int64()),
            "url": pa.array([r.url for r in ok], pa.string()),
            "caption": pa.array([r.caption for r in ok], pa.string()),
        },
        schema=INGEST_SCHEMA,
    )
    # Rejects first: the ingest part's presence is what marks this part as complete.
    write_parquet_atomic(layout.rejects_dir / part_name(index), rejects)
    write_parquet_atomic(layout.ingest_dir / part_name(index), ingested)


def ingest_source(source: str | Path, build_dir: str | Path, cfg: IngestConfig = IngestConfig()) -> dict[str, Any]:
    """Stream `source` into build_dir/ingest and build_dir/rejects; returns JSON-able counts.

    Idempotent: a finished ingest of the same source (same sha256 and rows_per_part) returns its recorded counts;
    an interrupted one is resumed, keeping the parts already written. A different source in the same build folder
    raises ValueError instead of silently mixing two sources.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"ingest source not found: {path}")
    layout = BuildLayout(Path(build_dir))
    source_sha256 = sha256_file(path)
    # Everything that changes WHAT is written (not how fast): a rerun must match it or be refused.
    content_cfg = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    identity = {"source_sha256": source_sha256, "rows_per_part": cfg.rows_per_part, "content_config": content_cfg}

    done_path = layout.ingest_dir / DONE_MARKER
    started_path = layout.ingest_dir / STARTED_MARKER
    for marker in (done_path, started_path):
        if marker.exists():
            recorded = read_json(marker)
            if {k: recorded.get(k) for k in identity} != identity:
                raise ValueError(
                    f"{layout.root} already holds an ingest of a different source or settings "
                    f"({marker.name}: sha256={recorded.get('source_sha256')}, "
                    f"settings={recorded.get('content_config')}); use a fresh build folder"
                )
    if done_path.exists():
        result = read_json(done_path)["result"]
        if all((layout.ingest_dir / p).exists() and (layout.rejects_dir / p).exists() for p in result["parts"]):
            return result
    write_json_atomic(started_path, {**identity, "source": str(path)})

    kind = source_kind(path)
    if kind == "parquet":
        total, unit = pq.ParquetFile(path).metadata.num_rows, "row"
        rows_iter = _parquet_rows
    else:
        total, unit = path.stat().st_size, "B"  # compressed bytes for .gz: the bar is approximate there
        rows_iter = _tsv_rows
    progress = _progress_bar(cfg, total, unit)

    read = ingested = 0
    rejects_by_reason: Counter[str] = Counter()
    parts: list[str] = []
    buffer: list[_Row] = []
    current_part = 0

    def flush(index: int, rows: list[_Row]) -> None:
        name = part_name(index)
        parts.append(name)
        if not (layout.ingest_dir / name).exists() or not (layout.rejects_dir / name).exists():
            _write_part(layout, index, rows)

    try:
        for row in rows_iter(path, cfg, progress):
            part_index = row.sample_id // cfg.rows_per_part
            if part_index != current_part:
                flush(current_part, buffer)
                buffer, current_part = [], part_index
            buffer.append(row)
            read += 1
            if row.reason is None:
                ingested += 1
            else:
                rejects_by_reason[row.reason] += 1
        if buffer or not parts:  # an empty source still gets one (empty) part so downstream stages see a unit
            flush(current_part, buffer)
    finally:
        progress.close()

    result = {
        "source": str(path),
        "source_kind": kind,
        "source_sha256": source_sha256,
        "source_rows": read,
        "read": read,
        "ingested": ingested,
        "rejected": read - ingested,
        "rejects_by_reason": dict(sorted(rejects_by_reason.items())),
        "parts": parts,
        "rows_per_part": cfg.rows_per_part,
    }
    write_json_atomic(done_path, {**identity, "result": result})
    started_path.unlink(missing_ok=True)
    return result
