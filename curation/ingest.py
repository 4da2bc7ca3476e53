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
  the "part done" signal and records (curation.io.with_unit_record) the fingerprint of what it holds.
- Content-addressed, for sources that grow: a rerun reads the source again and rewrites only the parts whose rows
  changed (the next stages see their fingerprints change and redo only those parts). Rows appended to a CC12M-style
  source therefore touch the last old part and add new ones; every other part, and everything made from it, stays
  as it is. Parts the source no longer reaches are removed with their captions/selected parts. `ingest-done.json`
  pins the source's sha256 (a rerun of an unchanged source is a footer check) and the result records what changed
  since the previous ingest ("changes": appended, changed or unchanged, rows before and now, parts touched).
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

from curation.io import (
    fingerprint_of,
    read_json,
    read_parquet,
    sha256_file,
    table_digest,
    unit_record,
    with_unit_record,
    write_json_atomic,
    write_parquet_atomic,
)
from manifests.layout import BuildLayout, part_name

DONE_MARKER = "ingest-done.json"
# Bump when the same source rows would give different part contents: every part is then rewritten.
INGEST_VERSION = 1

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


class SourceError(ValueError):
    """The build's source is missing, unreadable or not a source at all; found before anything is written."""


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


def _part_tables(rows: list[_Row]) -> tuple[pa.Table, pa.Table]:
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
    return ingested, rejects


def _is_prefix(old_path: Path, new: pa.Table) -> bool:
    old = read_parquet(old_path).replace_schema_metadata(None)
    return old.num_rows <= new.num_rows and old.equals(new.slice(0, old.num_rows))


def _write_part(layout: BuildLayout, index: int, rows: list[_Row], content_cfg: dict[str, Any]) -> tuple[str, str]:
    """Write part `index` unless it already holds exactly these rows; returns its fingerprint and "same", "new",
    "grown" (the old part's rows are a prefix of the new ones: rows were appended) or "changed"."""
    ingested, rejects = _part_tables(rows)
    name = part_name(index)
    ingest_path, rejects_path = layout.ingest_dir / name, layout.rejects_dir / name
    fingerprint = fingerprint_of({"stage": "ingest", "version": INGEST_VERSION, "config": content_cfg,
                                  "ingested": table_digest(ingested), "rejects": table_digest(rejects)})
    record = unit_record(ingest_path)
    if record is not None and rejects_path.exists():
        if record["fingerprint"] == fingerprint:
            return "same", fingerprint
        old_rows = pq.read_metadata(ingest_path).num_rows + pq.read_metadata(rejects_path).num_rows
        grown = old_rows < ingested.num_rows + rejects.num_rows and _is_prefix(ingest_path, ingested) \
            and _is_prefix(rejects_path, rejects)
        status = "grown" if grown else "changed"
    else:
        status = "new"
    # Rejects first: the ingest part's presence (with its record) is what marks this part as complete.
    write_parquet_atomic(rejects_path, rejects)
    write_parquet_atomic(ingest_path, with_unit_record(ingested, fingerprint))
    return status, fingerprint


def _remove_parts_beyond(layout: BuildLayout, parts: list[str]) -> list[str]:
    """Parts of a longer earlier source, and what the next stages made of them: they must not be read as ours."""
    keep = set(parts)
    removed = sorted({p.name for p in layout.parts(layout.ingest_dir) if p.name not in keep})
    for directory in (layout.ingest_dir, layout.rejects_dir, layout.captions_dir, layout.selected_dir):
        for path in layout.parts(directory) if directory.exists() else ():
            if path.name not in keep:
                path.unlink()
    return removed


def _unchanged_result(layout: BuildLayout, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded result when the source and settings are those of the finished ingest and every part still
    carries the fingerprint it was written with (footers only: a rerun of a big source costs one sha256 pass)."""
    done_path = layout.ingest_dir / DONE_MARKER
    if not done_path.exists():
        return None
    done = read_json(done_path)
    if {k: done.get(k) for k in identity} != identity:
        return None
    fingerprints = done.get("fingerprints", {})
    for part in done["result"]["parts"]:
        record = unit_record(layout.ingest_dir / part)
        if record is None or record["fingerprint"] != fingerprints.get(part) \
                or not (layout.rejects_dir / part).exists():
            return None
    unchanged = dict.fromkeys(done["result"]["parts"], "same")
    return {**done["result"], "changes": _changes(done, unchanged, [], done["result"]["read"])}


def _changes(previous: dict[str, Any] | None, statuses: dict[str, str], removed: list[str],
             read: int) -> dict[str, Any]:
    """What this ingest changed relative to the previous finished one (for the manifest and the retrain flow)."""
    before = previous["result"]["read"] if previous else 0
    rewritten = sorted(p for p, s in statuses.items() if s in ("grown", "changed"))
    added = sorted(p for p, s in statuses.items() if s == "new")
    if previous is None:
        kind = "new"
    elif not rewritten and not added and not removed:
        kind = "unchanged"
    elif removed or any(statuses[p] == "changed" for p in rewritten) or read < before:
        kind = "changed"
    else:
        kind = "appended"
    rows_added = read - before if kind in ("appended", "unchanged") else None
    return {"kind": kind, "rows_before": before, "rows_added": rows_added,
            "parts_rewritten": rewritten, "parts_added": added, "parts_removed": removed}


def ingest_source(source: str | Path, build_dir: str | Path, cfg: IngestConfig = IngestConfig()) -> dict[str, Any]:
    """Stream `source` into build_dir/ingest and build_dir/rejects; returns JSON-able counts and "changes".

    Idempotent and content-addressed: a part is rewritten only when its rows differ from what it holds, so a rerun
    of the same source writes nothing, an interrupted one resumes, and a grown or edited source rewrites only the
    parts it changed (see the module docstring).
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"ingest source not found: {path}")
    layout = BuildLayout(Path(build_dir))
    source_sha256 = sha256_file(path)
    # Everything that changes WHAT is written (not how fast).
    content_cfg = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    identity = {"source_sha256": source_sha256, "rows_per_part": cfg.rows_per_part, "content_config": content_cfg,
                "version": INGEST_VERSION}
    unchanged = _unchanged_result(layout, identity)
    if unchanged is not None:
        return unchanged
    done_path = layout.ingest_dir / DONE_MARKER
    # Kept until the new one replaces it: an ingest killed half-way still compares with the last finished one.
    previous = read_json(done_path) if done_path.exists() else None

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
    statuses: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    buffer: list[_Row] = []
    current_part = 0

    def flush(index: int, rows: list[_Row]) -> None:
        name = part_name(index)
        statuses[name], fingerprints[name] = _write_part(layout, index, rows, content_cfg)

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
        if buffer or not statuses:  # an empty source still gets one (empty) part so downstream stages see a unit
            flush(current_part, buffer)
    finally:
        progress.close()
    parts = list(statuses)
    removed = _remove_parts_beyond(layout, parts)

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
    changes = _changes(previous, statuses, removed, read)
    # "changes" stays in the marker until the source changes again: the manifest reports it (curation.history).
    write_json_atomic(done_path, {**identity, "fingerprints": fingerprints, "result": result, "changes": changes})
    return {**result, "changes": changes}
