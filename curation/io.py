"""Atomic writes and checksums for curation: the project's one implementation lives in `manifests.fileio` (fsync of
the file and its folder, then rename); this module adds the parquet writer and re-exports the rest, so stages keep
importing from `curation.io`."""
from __future__ import annotations

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
    "atomic_path", "read_json", "remove_stale_temporaries", "sha256_file", "write_bytes_atomic", "write_json_atomic",
    "write_parquet_atomic", "write_text_atomic",
]


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table, **kwargs: Any) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
