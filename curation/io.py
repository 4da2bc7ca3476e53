"""Atomic writes and checksums for curation: the project's one implementation lives in `manifests.fileio` (fsync of
the file and its folder, then rename); this module adds the parquet writer and re-exports the rest, so stages keep
importing from `curation.io`."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.fileio import (
    atomic_path,
    remove_stale_temporaries,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "UNIT_META_KEY", "atomic_path", "fingerprint_of", "parquet_digest", "read_json", "read_parquet", "remove_stale_temporaries",
    "sha256_file", "table_digest", "unit_content", "unit_record", "with_unit_record", "write_bytes_atomic", "write_json_atomic",
    "write_parquet_atomic", "write_text_atomic",
]

# A per-part stage output records, in its parquet metadata, the fingerprint of everything it was made from and the
# digest of its own content (which the next stage puts into ITS fingerprint): content-addressed units.
UNIT_META_KEY = b"cc4m.unit"


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """One parquet file as a table, schema metadata included. Not `pq.read_table`: that goes through
    pyarrow.dataset, whose import loads pandas, ~0.3 s of every short process (a rerun of a finished build costs
    about a second in all)."""
    with pq.ParquetFile(path) as parquet:
        return parquet.read(columns=columns)


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table, **kwargs: Any) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def table_digest(table: pa.Table) -> str:
    """sha256 of a table's content (schema metadata excluded): the identity of a stage input, whatever its mtime,
    its path or the run-time details a writer put in the file's metadata."""
    table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def parquet_digest(path: str | os.PathLike, columns: list[str]) -> str:
    """table_digest of those of `columns` the parquet file has (an older or hand-made file may lack some)."""
    present = set(pq.read_schema(path).names)
    return table_digest(read_parquet(path, columns=[c for c in columns if c in present]))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint_of(inputs: Any) -> str:
    """sha256 of a JSON-able description of a unit's inputs (content digests, config, stage and library versions)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def with_unit_record(table: pa.Table, fingerprint: str) -> pa.Table:
    """`table` with {"fingerprint", "content"} added to its metadata: what it was made from, and what it holds."""
    metadata = dict(table.schema.metadata or {})
    metadata[UNIT_META_KEY] = json.dumps({"fingerprint": fingerprint, "content": table_digest(table)}).encode()
    return table.replace_schema_metadata(metadata)


def unit_content(path: str | os.PathLike) -> str:
    """The content digest a unit recorded, or (a part without a record, e.g. hand-made) its table's digest."""
    record = unit_record(path)
    return record["content"] if record else table_digest(read_parquet(path))


def unit_record(path: str | os.PathLike) -> dict[str, str] | None:
    """The {"fingerprint", "content"} a unit's parquet recorded, or None (missing, unreadable or unrecorded)."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(UNIT_META_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(raw) if raw else None
