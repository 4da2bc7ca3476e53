"""Parse stage: ingest/<part> -> captions/<part> with the caption's entity classes and word offsets; plus the
`cc4m parse` command, which ingests and parses one source into a single parquet file.

The extractor (and its spaCy tagger) is built once per process and reused: flows call parse_part once per part.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.entities import DEFAULT_SPACY_MODEL, EntityExtractor, spacy_model_version, spacy_version
from curation.ingest import REJECT_SCHEMA, IngestConfig, ingest_source
from curation.io import (
    atomic_path,
    fingerprint_of,
    read_parquet,
    unit_content,
    unit_record,
    with_unit_record,
    write_parquet_atomic,
)
from curation.progress import Progress, ProgressCallback
from manifests.layout import BuildLayout
from manifests.version import code_version
from manifests.vocabulary import load_vocabulary

ENTITY_WORD_TYPE = pa.struct(
    [("word", pa.string()), ("class", pa.string()), ("start", pa.int32()), ("end", pa.int32())]
)
CAPTIONS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("entities", pa.list_(pa.string())),
        ("entity_words", pa.list_(ENTITY_WORD_TYPE)),
    ]
)


@dataclass(frozen=True)
class ParseConfig:
    vocabulary: str = "v1"
    spacy_model: str = DEFAULT_SPACY_MODEL
    batch_size: int = 256        # captions per spaCy batch (only the few captions that need the tagger)
    chunk_rows: int = 20_000     # captions handed to the extractor at a time (bounds memory per part)

    def __post_init__(self) -> None:
        if not self.vocabulary:
            raise ValueError("ParseConfig.vocabulary must name a vocabulary (e.g. 'v1')")
        if not self.spacy_model:
            raise ValueError("ParseConfig.spacy_model must name an installed spaCy model")
        for name in ("batch_size", "chunk_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ParseConfig.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=4)
def get_extractor(vocabulary: str, spacy_model: str, batch_size: int) -> EntityExtractor:
    """One extractor per process and settings (spaCy load + lexicon compile are paid once)."""
    return EntityExtractor(vocab=load_vocabulary(vocabulary), model=spacy_model, batch_size=batch_size)


def _parquet_metadata(extractor: EntityExtractor) -> dict[bytes, bytes]:
    return {
        b"cc4m.vocabulary_version": extractor.vocab.version.encode(),
        b"cc4m.spacy_model": extractor.spacy_model_name.encode(),
        b"cc4m.spacy_model_version": extractor.spacy_model_version.encode(),
        b"cc4m.spacy_version": extractor.spacy_version.encode(),
        b"cc4m.code_version": code_version().encode(),
    }


def parse_table(table: pa.Table, extractor: EntityExtractor, chunk_rows: int = 20_000,
                progress: Progress | None = None) -> pa.Table:
    """sample_id, url, caption -> the captions schema (entities sorted unique; entity_words in caption order)."""
    captions = table.column("caption").to_pylist()
    entities: list[list[str]] = []
    entity_words: list[list[dict[str, Any]]] = []
    for lo in range(0, len(captions), chunk_rows):
        for words in extractor.extract(captions[lo:lo + chunk_rows]):
            entities.append(sorted({w.cls for w in words}))
            entity_words.append([w.to_struct() for w in words])
        if progress is not None:
            progress.advance(len(captions[lo:lo + chunk_rows]))
    return pa.table(
        {
            "sample_id": table.column("sample_id").cast(pa.int64()),
            "url": table.column("url").cast(pa.string()),
            "caption": pa.array(captions, pa.string()),
            "entities": pa.array(entities, pa.list_(pa.string())),
            "entity_words": pa.array(entity_words, pa.list_(ENTITY_WORD_TYPE)),
        },
        schema=CAPTIONS_SCHEMA,
    )


def _counts(table: pa.Table) -> dict[str, Any]:
    per_class: Counter[str] = Counter()
    with_entities = 0
    for classes in table.column("entities").to_pylist():
        if classes:
            with_entities += 1
            per_class.update(classes)
    return {"rows": table.num_rows, "with_entities": with_entities,
            "per_class": dict(sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0])))}


# Bump when the same captions, vocabulary and spaCy model would give different entities: every part is reparsed.
PARSE_VERSION = 1


def part_fingerprint(ingest_part: Path, cfg: ParseConfig) -> str:
    """What a captions part is made from: its ingest part's content (as its unit record states it), the vocabulary,
    the spaCy model and spaCy (by version: no weights are loaded) and this stage's version."""
    vocab = load_vocabulary(cfg.vocabulary)
    return fingerprint_of({"stage": "parse", "version": PARSE_VERSION, "input": unit_content(ingest_part),
                           "vocabulary": [vocab.version, vocab.surface_words, vocab.synonyms],
                           "spacy_model": [cfg.spacy_model, spacy_model_version(cfg.spacy_model)],
                           "spacy": spacy_version()})


def parse_part(build_dir: str | Path, part: str, cfg: ParseConfig = ParseConfig(),
               progress: ProgressCallback | None = None) -> dict[str, Any]:
    """ingest/<part> -> captions/<part>. Content-addressed: skipped (only re-counted) when the existing output
    records the fingerprint of the current input and settings (`part_fingerprint`), redone otherwise.
    `progress` receives rows/s while the part is parsed (curation.progress)."""
    layout = BuildLayout(Path(build_dir))
    source = layout.ingest_dir / part
    target = layout.captions_dir / part
    if not source.exists():
        raise FileNotFoundError(f"parse_part: {source} does not exist (run ingest first)")
    fingerprint = part_fingerprint(source, cfg)
    record = unit_record(target)
    if record is not None and record["fingerprint"] == fingerprint:
        return {"part": part, "skipped": True, **_counts(read_parquet(target, columns=["entities"]))}
    extractor = get_extractor(cfg.vocabulary, cfg.spacy_model, cfg.batch_size)
    t0 = time.perf_counter()
    rows = read_parquet(source)
    meter = Progress(f"parse {part}", rows.num_rows, "row", progress)
    table = parse_table(rows, extractor, cfg.chunk_rows, meter)
    meter.finish()
    table = with_unit_record(table.replace_schema_metadata(_parquet_metadata(extractor)), fingerprint)
    write_parquet_atomic(target, table)
    return {"part": part, "skipped": False, "seconds": round(time.perf_counter() - t0, 3), **_counts(table)}


# ---------------------------------------------------------------------------------------------------------------
# cc4m parse INPUT -o OUTPUT.parquet
# ---------------------------------------------------------------------------------------------------------------
def add_parse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="url<TAB>caption TSV (.tsv, .tsv.gz) or parquet with url, caption columns")
    p.add_argument("-o", "--output", required=True, help="output parquet (rejects go to OUTPUT.rejects.parquet)")
    p.add_argument("--rows-per-part", type=int, default=IngestConfig.rows_per_part)
    p.add_argument("--workdir", default=None, help="keep the intermediate build folder here (default: a temp dir)")
    p.add_argument("--vocabulary", default="v1")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL)
    p.add_argument("--top", type=int, default=15, help="entity classes listed in the summary")
    p.add_argument("--progress", action="store_true", default=None, help="force a progress bar while ingesting")


def rejects_path_for(output: Path) -> Path:
    return output.with_name(output.stem + ".rejects.parquet")


def _concat_parts(paths: list[Path], output: Path, schema: pa.Schema, metadata: dict[bytes, bytes] | None) -> None:
    """Stream parts into one parquet file (one row group per part), atomically."""
    schema = schema.with_metadata(metadata) if metadata else schema
    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:
            writer.write_table(read_parquet(path).cast(schema))


def cli_parse(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix != ".parquet":
        print(f"cc4m parse: output must end in .parquet, got {output}", file=sys.stderr)
        return 2
    if not Path(args.input).is_file():
        print(f"cc4m parse: input not found: {args.input}", file=sys.stderr)
        return 2
    ingest_cfg = IngestConfig(rows_per_part=args.rows_per_part, progress=getattr(args, "progress", None))
    parse_cfg = ParseConfig(vocabulary=args.vocabulary, spacy_model=args.spacy_model)

    tmp_root = None
    if args.workdir:
        build_dir = Path(args.workdir)
    else:
        tmp_root = tempfile.mkdtemp(prefix="cc4m-parse-", dir=output.parent if output.parent.exists() else None)
        build_dir = Path(tmp_root)
    try:
        t0 = time.perf_counter()
        try:
            ingest = ingest_source(args.input, build_dir, ingest_cfg)
        except ValueError as err:  # e.g. a --workdir that holds another source's ingest
            print(f"cc4m parse: {err}", file=sys.stderr)
            return 2
        t_parse = time.perf_counter()
        per_class: Counter[str] = Counter()
        with_entities = rows = 0
        for part in ingest["parts"]:
            result = parse_part(build_dir, part, parse_cfg)
            rows += result["rows"]
            with_entities += result["with_entities"]
            per_class.update(result["per_class"])
        parse_s = time.perf_counter() - t_parse
        layout = BuildLayout(build_dir)
        extractor = get_extractor(parse_cfg.vocabulary, parse_cfg.spacy_model, parse_cfg.batch_size)
        _concat_parts([layout.captions_dir / p for p in ingest["parts"]], output, CAPTIONS_SCHEMA,
                      _parquet_metadata(extractor))
        _concat_parts([layout.rejects_dir / p for p in ingest["parts"]], rejects_path_for(output), REJECT_SCHEMA,
                      None)
        total_s = time.perf_counter() - t0
    finally:
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)

    assert rows == ingest["ingested"], "every ingested row must be parsed"
    print(f"read {ingest['read']} rows from {args.input}")
    print(f"rejected {ingest['rejected']}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in ingest["rejects_by_reason"].items()) + ")"
        if ingest["rejected"] else "") + f" -> {rejects_path_for(output)}")
    share = f"{100 * with_entities / rows:.1f}%" if rows else "n/a"
    print(f"parsed {rows} captions; {with_entities} ({share}) with >= 1 entity -> {output}")
    if per_class:
        print("top classes: " + ", ".join(f"{c} {n}" for c, n in per_class.most_common(args.top)))
    print(f"speed: {rows / parse_s if parse_s > 0 else float('inf'):.0f} captions/s parse, "
          f"{ingest['read'] / total_s if total_s > 0 else float('inf'):.0f} rows/s end to end")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cc4m parse")
    add_parse_arguments(parser)
    return cli_parse(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
