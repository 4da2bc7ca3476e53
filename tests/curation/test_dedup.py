"""Dedup stage: exact and near duplicates on tiny synthetic builds, images injected (no staging, no img2dataset)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from curation.dedup import DedupConfig, deduplicate, find_duplicates, hash_batch, near_pairs
from curation.imagehash import hamming, phash_bytes, phash_pixels, stored_hashes
from manifests.layout import BuildLayout, part_name

CLASSES = ["dog", "cat", "car", "people", "bus"]


def smooth_image(seed: int, size: int = 128) -> Image.Image:
    """A random but smooth picture: low-frequency structure is what a perceptual hash sees."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_build(root: Path, statuses: dict[int, str]) -> BuildLayout:
    """selected/ part + downloads.parquet for the given sample ids."""
    layout = BuildLayout(root)
    ids = sorted(statuses)
    entities = [[CLASSES[i % len(CLASSES)], CLASSES[(i + 2) % len(CLASSES)]] for i in ids]
    entities = [sorted(set(e)) for e in entities]
    layout.selected_dir.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "url": [f"http://x.invalid/{i}.jpg" for i in ids],
                "caption": [" and ".join(e) for e in entities],
                "entities": pa.array(entities, pa.list_(pa.string())),
            }
        ),
        layout.selected_dir / part_name(0),
    )
    status = [statuses[i] for i in ids]
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "url": [f"http://x.invalid/{i}.jpg" for i in ids],
                "status": status,
                "error_message": [None if s == "success" else "HTTP Error 404" for s in status],
                "width": pa.array([128] * len(ids), pa.int32()),
                "height": pa.array([128] * len(ids), pa.int32()),
                "sha256": [None] * len(ids),
            }
        ),
        layout.downloads,
    )
    return layout


@pytest.fixture()
def scenario(tmp_path: Path) -> tuple[BuildLayout, dict[int, bytes]]:
    """ids 0..9 distinct images, except: 5 = byte copy of 1, 8 = re-encoded brighter copy of 2, 9 = copy of 5 (so of
    1), 7 failed to download, 3 = re-encoded copy of 6 (3 < 6, so 6 is the duplicate)."""
    images = {i: jpeg(smooth_image(i)) for i in range(10)}
    images[5] = images[1]
    images[9] = images[1]
    images[8] = jpeg(ImageEnhance.Brightness(smooth_image(2)).enhance(1.04), quality=80)
    images[3] = jpeg(smooth_image(6), quality=70)
    statuses = {i: "success" for i in range(10)}
    statuses[7] = "failed_to_download"
    layout = write_build(tmp_path, statuses)
    return layout, {i: b for i, b in images.items() if statuses[i] == "success"}


def test_phash_separates_copies_from_different_images() -> None:
    base = smooth_image(11)
    h = phash_bytes(jpeg(base))
    near = phash_bytes(jpeg(ImageEnhance.Brightness(base).enhance(1.04), quality=70))
    assert int(hamming(h, near)) <= 4
    others = [phash_bytes(jpeg(smooth_image(s))) for s in range(20, 30)]
    assert min(int(hamming(h, o)) for o in others) > 8
    # A constant image has no structure: all DCT coefficients but DC are ~0; the hash is still well defined.
    assert phash_pixels(np.full((1, 32, 32), 7.0)).dtype == np.uint64


def test_hashes_made_by_the_download_workers_equal_dedups_own_and_spare_every_decode(
        scenario: tuple[BuildLayout, dict[int, bytes]]) -> None:
    layout, images = scenario
    blank = jpeg(Image.new("RGB", (64, 64), (128, 128, 128)))  # all AC coefficients ~0: rounding decides its bits
    items = [*images.items(), (99, blank)]
    _ids, sha, phash, ok = hash_batch(items, 8, 4, near=True)
    for (sid, data), digest, bits in zip(items, sha, phash, strict=True):
        assert stored_hashes(data) == (bytes(digest).hex(), int(bits)), sid
    assert ok.all()

    by_decoding = deduplicate(layout.root, DedupConfig(), images=list(images.items()))
    expected = [pq.read_table(p).to_pylist() for p in (layout.kept, layout.duplicates)]
    downloads = pq.read_table(layout.downloads)
    hashes = [stored_hashes(images[sid]) if sid in images else (None, None)
              for sid in downloads["sample_id"].to_pylist()]
    downloads = downloads.append_column("stored_sha256", pa.array([h[0] for h in hashes], pa.string()))
    downloads = downloads.append_column("stored_phash", pa.array([h[1] for h in hashes], pa.uint64()))
    pq.write_table(downloads, layout.downloads)
    layout.kept.unlink()
    states: list[dict] = []
    from_download = deduplicate(layout.root, DedupConfig(), progress=states.append)  # none staged: must read none
    assert from_download["images_hashed"] == 0 and from_download["hashes_from_download"] == len(images)
    assert (states[-1]["done"], states[-1]["total"]) == (len(images), len(images))  # still shows it ran to 100 %
    assert [pq.read_table(p).to_pylist() for p in (layout.kept, layout.duplicates)] == expected
    assert {k: from_download[k] for k in ("checked", "exact_removed", "near_removed", "kept")} == \
        {k: by_decoding[k] for k in ("checked", "exact_removed", "near_removed", "kept")}


def test_deduplicate_finds_exact_and_near(scenario: tuple[BuildLayout, dict[int, bytes]]) -> None:
    layout, images = scenario
    counts = deduplicate(layout.root, DedupConfig(), images=list(images.items()))
    assert counts["checked"] == 9 and counts["exact_removed"] == 2 and counts["near_removed"] == 2
    assert counts["kept"] == 5 and counts["skipped"] is False
    dups = pq.read_table(layout.duplicates).to_pylist()
    by_id = {d["sample_id"]: d for d in dups}
    assert set(by_id) == {5, 6, 8, 9}
    assert by_id[5]["duplicate_of"] == 1 and by_id[5]["kind"] == "exact" and by_id[5]["distance"] == 0
    assert by_id[9]["duplicate_of"] == 1 and by_id[9]["kind"] == "exact"
    assert by_id[8]["duplicate_of"] == 2 and by_id[8]["kind"] == "near" and by_id[8]["distance"] <= 4
    assert by_id[6]["duplicate_of"] == 3 and by_id[6]["kind"] == "near"
    kept = pq.read_table(layout.kept)
    kept_ids = kept["sample_id"].to_pylist()
    assert kept_ids == [0, 1, 2, 3, 4]
    assert all(d["duplicate_of"] in kept_ids for d in dups)
    successes = set(images)
    assert set(kept_ids) == successes - set(by_id)
    # entities joined from selected/, phash and sha256 of the stored bytes recorded
    assert kept["entities"].to_pylist()[1] == sorted({CLASSES[1], CLASSES[3]})
    assert kept.schema.field("phash").type == pa.uint64()
    import hashlib

    assert kept["sha256"].to_pylist()[0] == hashlib.sha256(images[0]).hexdigest()
    # idempotent: a second run is skipped and reports the same counts; a new config recomputes
    again = deduplicate(layout.root, DedupConfig(), images=[])
    assert again["skipped"] is True and {k: again[k] for k in ("checked", "kept")} == {"checked": 9, "kept": 5}
    exact_only = deduplicate(layout.root, DedupConfig(near=False), images=list(images.items()))
    assert exact_only["exact_removed"] == 2 and exact_only["near_removed"] == 0 and exact_only["kept"] == 7


def test_disabled_keeps_all_successes(scenario: tuple[BuildLayout, dict[int, bytes]]) -> None:
    layout, images = scenario
    counts = deduplicate(layout.root, DedupConfig(enabled=False), images=None)  # never touches the images
    assert counts["kept"] == 9 and counts["exact_removed"] == counts["near_removed"] == 0
    assert pq.read_table(layout.duplicates).num_rows == 0
    assert pq.read_table(layout.kept)["sample_id"].to_pylist() == sorted(images)


def test_missing_image_is_an_error(scenario: tuple[BuildLayout, dict[int, bytes]]) -> None:
    layout, images = scenario
    images.pop(4)
    with pytest.raises(ValueError, match="no staged image"):
        deduplicate(layout.root, DedupConfig(), images=list(images.items()))
    assert not layout.kept.exists()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="hash_size"):
        DedupConfig(hash_size=16)
    with pytest.raises(ValueError, match="max_hamming"):
        DedupConfig(max_hamming=-1)


def brute_force(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Leader clustering by definition: removed iff a kept smaller id is within the radius; points to the smallest."""
    keeper = np.full(len(hashes), -1)
    for i in range(len(hashes)):
        for j in range(i):
            if keeper[j] < 0 and int(hamming(hashes[i], hashes[j])) <= radius:
                keeper[i] = j
                break
    removed = np.flatnonzero(keeper >= 0)
    return removed, keeper[removed]


@pytest.mark.parametrize("force_multihash", [False, True])
def test_find_duplicates_matches_brute_force(force_multihash: bool) -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    # clusters: flip 0..6 random bits of a few bases, and repeat some hashes exactly
    hashes = []
    for _ in range(300):
        h = int(base[rng.integers(0, len(base))])
        for bit in rng.choice(64, rng.integers(0, 7), replace=False):
            h ^= 1 << int(bit)
        hashes.append(h)
    hashes = np.array(hashes, np.uint64)
    ids = np.arange(len(hashes), dtype=np.int64) * 3
    removed, keepers, is_exact, distance = find_duplicates(
        ids, None, hashes, np.ones(len(hashes), bool), DedupConfig(exact=False), force_multihash=force_multihash
    )
    exp_removed, exp_keepers = brute_force(hashes, 4)
    assert removed.tolist() == exp_removed.tolist()
    assert keepers.tolist() == exp_keepers.tolist()
    assert not is_exact.any() and (distance <= 4).all()
    assert set(keepers.tolist()).isdisjoint(removed.tolist())


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 4, 5, 6])
def test_near_pairs_flat_and_multihash_agree(radius: int) -> None:
    rng = np.random.default_rng(radius)
    hashes = np.unique(rng.integers(0, 2**14, 400, dtype=np.uint64))  # dense in the low bits: many close pairs
    # spread some of them over the high bits too, so every substring of the multi-hash is exercised
    hashes = np.unique(np.concatenate([hashes, hashes[:100] << np.uint64(50), hashes[:100] << np.uint64(25)]))
    flat = set(zip(*near_pairs(hashes, radius), strict=True))
    multi = set(zip(*near_pairs(hashes, radius, force_multihash=True), strict=True))
    assert flat == multi
    if radius == 0:  # the hashes are distinct
        assert not flat
        return
    i, j = map(np.array, zip(*flat, strict=True))
    assert (hamming(hashes[i], hashes[j]) <= radius).all()


def test_worker_processes_give_the_same_result(scenario: tuple[BuildLayout, dict[int, bytes]]) -> None:
    layout, images = scenario
    images[0] = b"not a jpeg"  # undecodable: counted, kept, only checked for exact copies
    serial = deduplicate(layout.root, DedupConfig(), images=list(images.items()))
    serial_tables = [pq.read_table(p).to_pylist() for p in (layout.duplicates, layout.kept)]
    assert deduplicate(layout.root, DedupConfig(workers=2), images=[])["skipped"] is True  # same result config
    layout.kept.unlink()
    parallel = deduplicate(layout.root, DedupConfig(workers=2), images=list(images.items()))
    assert {k: v for k, v in parallel.items()} == serial and serial["phash_failed"] == 1
    assert [pq.read_table(p).to_pylist() for p in (layout.duplicates, layout.kept)] == serial_tables
    assert pq.read_table(layout.kept)["phash"][0].as_py() is None
