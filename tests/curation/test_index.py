"""Index stage: entity index, co-occurrence and partners on small random kept sets, checked against brute force."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.index import IndexConfig, build_index, draw_partners, entity_table
from manifests.layout import BuildLayout

CLASSES = [f"class{i:02d}" for i in range(12)]


def random_kept(seed: int, n: int = 400) -> dict[int, list[str]]:
    """Sample ids with gaps; skewed class frequencies; 1-4 classes; a few classes held by a single sample."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10 * n, n, replace=False))
    p = 1.0 / np.arange(1, len(CLASSES) - 1) ** 1.2
    p /= p.sum()
    kept = {}
    for sid in ids.tolist():
        m = int(rng.integers(1, 5))
        kept[sid] = sorted(set(rng.choice(CLASSES[:-2], m, p=p).tolist()))
    # two isolated samples: their only class is theirs alone
    kept[int(ids[3])] = [CLASSES[-2]]
    kept[int(ids[7])] = [CLASSES[-1]]
    return kept


def write_kept(root: Path, kept: dict[int, list[str]]) -> BuildLayout:
    layout = BuildLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = sorted(kept)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "entities": pa.array([kept[i] for i in ids], pa.list_(pa.string())),
            }
        ),
        layout.kept,
    )
    return layout


@pytest.fixture()
def built(tmp_path: Path) -> tuple[BuildLayout, dict[int, list[str]], dict]:
    kept = random_kept(0)
    layout = write_kept(tmp_path, kept)
    counts = build_index(layout.root, IndexConfig(partners_per_sample=10, seed=0))
    return layout, kept, counts


def test_entity_index_and_cooccurrence_match_brute_force(built) -> None:
    layout, kept, counts = built
    expected_index: dict[str, list[int]] = {}
    for sid in sorted(kept):
        for c in kept[sid]:
            expected_index.setdefault(c, []).append(sid)
    table = pq.read_table(layout.entity_index).to_pylist()
    assert {r["class"]: r["sample_ids"] for r in table} == expected_index
    assert [r["class"] for r in table] == sorted(expected_index)

    expected_pairs = Counter(pair for ents in kept.values() for pair in itertools.combinations(sorted(ents), 2))
    cooc = pq.read_table(layout.cooccurrence).to_pylist()
    assert {(r["class_a"], r["class_b"]): r["count"] for r in cooc} == dict(expected_pairs)
    assert all(r["class_a"] < r["class_b"] for r in cooc)
    assert counts["cooccurring_pairs"] == len(expected_pairs)


def test_partners_contract(built) -> None:
    layout, kept, counts = built
    rows = pq.read_table(layout.partners).to_pylist()
    by_sample: dict[int, list[dict]] = {}
    for r in rows:
        by_sample.setdefault(r["sample_id"], []).append(r)
    class_members = Counter(c for ents in kept.values() for c in ents)
    isolated = {s for s, ents in kept.items() if all(class_members[c] == 1 for c in ents)}
    assert len(isolated) >= 2
    for sid, ents in kept.items():
        got = by_sample.get(sid, [])
        assert [r["rank"] for r in got] == list(range(len(got)))
        partner_ids = [r["partner_id"] for r in got]
        assert sid not in partner_ids
        assert len(set(partner_ids)) == len(partner_ids)  # drawn without replacement
        for r in got:
            assert r["partner_id"] in kept
            assert r["shared_class"] in ents and r["shared_class"] in kept[r["partner_id"]]
        candidates = {o for o, e in kept.items() if o != sid and set(e) & set(ents)}
        assert len(got) == min(10, len(candidates))
    assert counts["samples_without_partners"] == len(isolated)
    assert counts["samples"] == len(kept) and counts["partners"] == len(rows)
    assert counts["samples_with_k_partners"] + counts["samples_with_fewer_partners"] + len(isolated) == len(kept)


def test_partners_reproducible_and_seeded(tmp_path: Path) -> None:
    kept = random_kept(1)
    results = []
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        layout = write_kept(tmp_path / name, kept)
        build_index(layout.root, IndexConfig(seed=seed))
        results.append(pq.read_table(layout.partners).to_pylist())
    assert results[0] == results[1]
    assert results[0] != results[2]
    # idempotent: a rerun is skipped; a different K rebuilds
    again = build_index(tmp_path / "a", IndexConfig(seed=5))
    assert again["skipped"] is True
    three = build_index(tmp_path / "a", IndexConfig(seed=5, partners_per_sample=3))
    assert three["skipped"] is False
    got = Counter(r["sample_id"] for r in pq.read_table(tmp_path / "a" / "index" / "partners.parquet").to_pylist())
    assert max(got.values()) == 3


def test_small_pools_get_all_candidates() -> None:
    """Tiny classes go through the exact enumeration path; big ones through rejection. Both respect the contract."""
    kept = {0: ["a"], 1: ["a"], 2: ["a", "b"], 3: ["b"], 4: ["c"]}
    for i in range(5, 60):
        kept[i] = ["big"] + (["a"] if i == 5 else [])
    ids = sorted(kept)
    t = entity_table(np.array(ids), pa.array([kept[i] for i in ids], pa.list_(pa.string())))
    offsets, partners, _classes, _ = draw_partners(t, k=4, seed=0)
    got = {ids[r]: sorted(ids[p] for p in partners[offsets[r] : offsets[r + 1]]) for r in range(len(ids))}
    assert got[0] == [1, 2, 5] and got[3] == [2] and got[4] == []
    assert len(got[6]) == 4 and 6 not in got[6]


def test_partner_class_draw_is_roughly_uniform_over_own_classes() -> None:
    """Class first, then partner: a sample with one rare and one frequent class draws each about half the time."""
    kept = {i: ["common"] for i in range(1, 400)}
    for i in range(400, 440):
        kept[i] = ["rare"]
    kept[0] = ["common", "rare"]
    ids = sorted(kept)
    t = entity_table(np.array(ids), pa.array([kept[i] for i in ids], pa.list_(pa.string())))
    shares = []
    for seed in range(60):
        offsets, _, classes, _ = draw_partners(t, k=10, seed=seed)
        rare_code = t.class_names.index("rare")
        shares.append(np.mean(classes[offsets[0] : offsets[1]] == rare_code))
    assert 0.4 < float(np.mean(shares)) < 0.6


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="partners_per_sample"):
        IndexConfig(partners_per_sample=0)
    with pytest.raises(ValueError, match="partner_mode"):
        IndexConfig(partner_mode="random")


WORDS = ["beach", "snow", "city", "park", "night", "grass"]


def bag_of_words(captions: list[str]) -> np.ndarray:
    """A transparent stand-in for the sentence encoder: normalised word counts over a tiny vocabulary."""
    x = np.array([[c.split().count(w) for w in WORDS] for c in captions], np.float32) + 1e-3
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_captioned(root: Path, captions: dict[int, tuple[list[str], str]]) -> BuildLayout:
    layout = write_kept(root, {i: e for i, (e, _) in captions.items()})
    layout.selected_dir.mkdir()
    ids = sorted(captions)
    pq.write_table(
        pa.table({"sample_id": pa.array(ids, pa.int64()), "caption": [captions[i][1] for i in ids]}),
        layout.selected_dir / "part-00000.parquet",
    )
    return layout


CAPTIONED = {
    0: (["dog"], "dog beach beach"),
    1: (["dog"], "dog snow snow"),
    2: (["dog"], "dog beach beach beach"),
    3: (["dog"], "dog snow"),
    4: (["cat", "dog"], "cat dog city"),
    5: (["cat"], "cat city city"),
    6: (["cat"], "cat night"),
    7: (["bus"], "bus alone"),
}


def test_embedding_partners_pick_the_most_similar_caption(tmp_path: Path) -> None:
    layout = write_captioned(tmp_path, CAPTIONED)
    counts = build_index(layout.root, IndexConfig(partners_per_sample=1, partner_mode="embedding"), embed=bag_of_words)
    got = {r["sample_id"]: (r["partner_id"], r["shared_class"]) for r in pq.read_table(layout.partners).to_pylist()}
    assert got[0] == (2, "dog") and got[2] == (0, "dog") and got[1] == (3, "dog") and got[3] == (1, "dog")
    assert got[5] == (4, "cat")
    assert 7 not in got and counts["samples_without_partners"] == 1


def test_embedding_partners_contract(tmp_path: Path) -> None:
    layout = write_captioned(tmp_path, CAPTIONED)
    cfg = IndexConfig(partners_per_sample=3, partner_mode="embedding", seed=1)
    build_index(layout.root, cfg, embed=bag_of_words)
    rows = pq.read_table(layout.partners).to_pylist()
    by_sample: dict[int, list[dict]] = {}
    for r in rows:
        by_sample.setdefault(r["sample_id"], []).append(r)
    for sid, got in by_sample.items():
        ents = CAPTIONED[sid][0]
        partners = [r["partner_id"] for r in got]
        assert sid not in partners and len(set(partners)) == len(partners) <= 3
        assert all(r["shared_class"] in ents and r["shared_class"] in CAPTIONED[r["partner_id"]][0] for r in got)
        candidates = {o for o, (e, _) in CAPTIONED.items() if o != sid and set(e) & set(ents)}
        assert len(got) == min(3, len(candidates))
    again = tmp_path / "again"
    build_index(write_captioned(again, CAPTIONED).root, cfg, embed=bag_of_words)
    assert pq.read_table(again / "index" / "partners.parquet").to_pylist() == rows


@pytest.mark.slow
def test_embedding_partners_with_minilm(tmp_path: Path) -> None:
    """The bundled MiniLM encoder, offline: paraphrases are each other's partner."""
    captions = {
        0: (["dog"], "a dog running on the sandy beach"),
        1: (["dog"], "a dog sleeping on a sofa in the living room"),
        2: (["dog"], "a puppy dog runs along the beach by the sea"),
        3: (["dog"], "dog lying on the couch indoors"),
    }
    layout = write_captioned(tmp_path, captions)
    build_index(layout.root, IndexConfig(partners_per_sample=1, partner_mode="embedding"))
    got = {r["sample_id"]: r["partner_id"] for r in pq.read_table(layout.partners).to_pylist()}
    assert got == {0: 2, 2: 0, 1: 3, 3: 1}
