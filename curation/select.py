"""Select stage: decide which parsed captions are worth downloading (>= `min_entities` classes of the vocabulary).

captions/<part> -> selected/<part>, same columns, only the kept rows. It only *decides* (datacomp style): nothing is
fetched here. Every dropped row is counted by reason; the counts travel inside the selected part's parquet key-value
metadata so a skipped (already done) part still reports them, and so the manifest can re-read them from disk.

Drop reasons:
    no_entity          the caption names none of the vocabulary's classes
    no_allowed_entity  it names classes, but none on the allow-list (`allowed_classes`)
    too_few_entities   fewer than `min_entities` (allowed) classes
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io import fingerprint_of, read_parquet, unit_content, unit_record, with_unit_record, write_parquet_atomic
from manifests.layout import BuildLayout
from manifests.vocabulary import load_vocabulary

SELECT_COUNTS_KEY = b"cc4m.select"
DROP_REASONS = ("no_entity", "no_allowed_entity", "too_few_entities")


@dataclass(frozen=True)
class SelectConfig:
    """min_entities: a row needs at least this many distinct (allowed) classes.
    allowed_classes: optional allow-list of class names; when set, `entities`/`entity_words` of the selected rows are
    restricted to it (training then only ever sees allowed classes)."""

    min_entities: int = 1
    allowed_classes: tuple[str, ...] | None = None
    vocabulary: str = "v1"

    def __post_init__(self) -> None:
        if not isinstance(self.min_entities, int) or self.min_entities < 1:
            raise ValueError(f"SelectConfig.min_entities must be an int >= 1, got {self.min_entities!r}")
        if self.allowed_classes is not None:
            allowed = tuple(self.allowed_classes)
            object.__setattr__(self, "allowed_classes", allowed)
            if not allowed:
                raise ValueError("SelectConfig.allowed_classes is empty: nothing could be selected (use None for all)")
            known = set(load_vocabulary(self.vocabulary).classes)
            unknown = sorted(set(allowed) - known)
            if unknown:
                raise ValueError(f"SelectConfig.allowed_classes not in vocabulary {self.vocabulary!r}: {unknown}")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:16]


def _read_counts(path: Path) -> dict[str, Any] | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(SELECT_COUNTS_KEY)
    return json.loads(raw) if raw else None


# Bump when the same captions and config would select differently: every part is selected again.
SELECT_VERSION = 1


def _part_fingerprint(captions_part: Path, cfg: SelectConfig) -> str:
    """The captions part's content (its unit record, else hashed here), the config and this stage's version."""
    return fingerprint_of({"stage": "select", "version": SELECT_VERSION, "input": unit_content(captions_part),
                           "config": cfg.fingerprint()})


def select_part(build_dir: str | Path, part: str, cfg: SelectConfig) -> dict[str, Any]:
    """captions/<part> -> selected/<part>. Returns {"part", "parsed", "selected", "dropped", "dropped_by_reason",
    "skipped"}. Content-addressed: a part whose output records the fingerprint of the current captions part and
    config is skipped (its stored counts are returned), any other is selected again."""
    layout = BuildLayout(Path(build_dir))
    src = layout.captions_dir / part
    dst = layout.selected_dir / part
    if not src.exists():
        raise FileNotFoundError(f"select: missing input {src} (run parse first)")
    fingerprint = _part_fingerprint(src, cfg)
    record = unit_record(dst)
    if record is not None and record["fingerprint"] == fingerprint:
        counts = _read_counts(dst)
        if counts is not None:
            return {**counts["counts"], "skipped": True}

    table = read_parquet(src)
    for col in ("sample_id", "entities", "entity_words"):
        if col not in table.column_names:
            raise ValueError(f"select: {src} lacks column {col!r} (columns: {table.column_names})")
    n_classes = pc.list_value_length(table["entities"]).fill_null(0).to_pylist()

    if cfg.allowed_classes is None:
        allowed_entities = None
        n_allowed = n_classes
    else:
        allowed = set(cfg.allowed_classes)
        allowed_entities = [[c for c in (ents or []) if c in allowed] for ents in table["entities"].to_pylist()]
        n_allowed = [len(a) for a in allowed_entities]

    dropped_by_reason = dict.fromkeys(DROP_REASONS, 0)
    keep_mask: list[bool] = []
    for total, ok in zip(n_classes, n_allowed):
        if total == 0:
            dropped_by_reason["no_entity"] += 1
            keep_mask.append(False)
        elif ok == 0:
            dropped_by_reason["no_allowed_entity"] += 1
            keep_mask.append(False)
        elif ok < cfg.min_entities:
            dropped_by_reason["too_few_entities"] += 1
            keep_mask.append(False)
        else:
            keep_mask.append(True)

    if allowed_entities is not None:
        allowed = set(cfg.allowed_classes or ())
        words = [[w for w in (ws or []) if w["class"] in allowed] for ws in table["entity_words"].to_pylist()]
        table = table.set_column(
            table.column_names.index("entities"), table.schema.field("entities"),
            pa.array(allowed_entities, type=table.schema.field("entities").type),
        )
        table = table.set_column(
            table.column_names.index("entity_words"), table.schema.field("entity_words"),
            pa.array(words, type=table.schema.field("entity_words").type),
        )
    selected = table.filter(pa.array(keep_mask, type=pa.bool_()))

    counts = {
        "part": part,
        "parsed": table.num_rows,
        "selected": selected.num_rows,
        "dropped": table.num_rows - selected.num_rows,
        "dropped_by_reason": dropped_by_reason,
    }
    if counts["parsed"] != counts["selected"] + sum(dropped_by_reason.values()):  # guards the logic above
        raise AssertionError(f"select: counts do not add up for {part}: {counts}")
    # Keep the parse stage's metadata (vocabulary version, spaCy model) and add our own counts.
    metadata = dict(table.schema.metadata or {})
    metadata[SELECT_COUNTS_KEY] = json.dumps({"config": cfg.fingerprint(), "counts": counts}, sort_keys=True).encode()
    write_parquet_atomic(dst, with_unit_record(selected.replace_schema_metadata(metadata), fingerprint))
    return {**counts, "skipped": False}


def selected_counts(build_dir: str | Path) -> dict[str, Any]:
    """Totals over every selected part, read back from the parts' metadata (for the manifest)."""
    layout = BuildLayout(Path(build_dir))
    totals: dict[str, Any] = {"parsed": 0, "selected": 0, "dropped": 0,
                              "dropped_by_reason": dict.fromkeys(DROP_REASONS, 0)}
    for path in layout.parts(layout.selected_dir):
        counts = _read_counts(path)
        if counts is None:
            raise ValueError(f"{path} has no select counts in its metadata (not written by curation.select)")
        c = counts["counts"]
        for key in ("parsed", "selected", "dropped"):
            totals[key] += c[key]
        for reason, n in c["dropped_by_reason"].items():
            totals["dropped_by_reason"][reason] = totals["dropped_by_reason"].get(reason, 0) + n
    return totals
