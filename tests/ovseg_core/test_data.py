"""Data pipeline over a tiny contract-format build: batch keys/shapes, partner by locator, val split, resume skip."""
from __future__ import annotations

import itertools
import tarfile

import pytest
import torch

from ovseg_core.data.cc4m import BuildReader, is_val_sample
from ovseg_core.data.loader import CC4MMapDataset, CC4MTrainStream, SampleProcessor, collate, make_train_loader
from ovseg_core.data.transforms import build_eval_transform, build_train_transform

SIZE, MAX_LEN = 32, 24


def processor(reader, tok, stage=1, augment="none", val_percent=0.0):
    return SampleProcessor(reader, tok, MAX_LEN, build_train_transform(SIZE, augment), stage=stage,
                           partner_transform=build_train_transform(SIZE, augment), val_percent=val_percent)


def tar_member_bytes(reader: BuildReader, sample_id: int) -> bytes:
    loc = reader.locate(sample_id)
    with tarfile.open(reader.shards_dir / loc.shard) as tar:
        return tar.extractfile(f"{sample_id:012d}.jpg").read()


def test_reader_counts_and_locator(fixture_build):
    reader = BuildReader(fixture_build)
    assert reader.num_samples() == 24 and len(reader.shard_paths) == 3
    for sid in reader.sample_ids():
        assert reader.read_jpeg(sid) == tar_member_bytes(reader, sid)
    with pytest.raises(KeyError, match="not in"):
        reader.read_jpeg(10**9)


@pytest.mark.parametrize("stage", [1, 2])
def test_batches_have_contract_keys_and_shapes(fixture_build, minilm_tokenizer, stage):
    reader = BuildReader(fixture_build)
    stream = CC4MTrainStream(reader, processor(reader, minilm_tokenizer, stage, augment="deit" if stage == 1 else
                                               "light"), seed=0, shuffle_buffer=8, batch_size=4)
    batch = next(iter(make_train_loader(stream, 4)))
    keys = {"image", "input_ids", "attention_mask", "question_ids", "question_mask", "answer_ids", "answer_mask",
            "has_entity"}
    if stage == 2:
        keys |= {"partner_image", "partner_valid", "shared_ids", "shared_mask"}
    assert keys <= set(batch)
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    for k in ("input_ids", "attention_mask", "question_ids", "question_mask", "answer_ids", "answer_mask"):
        assert batch[k].shape == (4, MAX_LEN) and batch[k].dtype == torch.long
    assert batch["has_entity"].dtype == torch.bool and batch["has_entity"].all()
    assert ((batch["question_ids"] == minilm_tokenizer.mask_token_id).sum(1) >= 1).all()
    if stage == 2:
        assert batch["partner_image"].shape == (4, 3, SIZE, SIZE) and batch["partner_valid"].dtype == torch.bool
        assert batch["shared_ids"].shape == (4, MAX_LEN)
        assert (batch["partner_id"] != batch["sample_id"]).all()


def test_partner_is_fetched_by_id_and_never_self(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    proc = processor(reader, minilm_tokenizer, stage=2)
    fetched = []
    real_read = reader.read_jpeg
    reader.read_jpeg = lambda sid: fetched.append(sid) or real_read(sid)  # record which ids the processor fetches
    ds = CC4MMapDataset(reader, proc, reader.sample_ids())
    for i in range(len(ds)):
        fetched.clear()
        sample = ds[i]
        sid = sample["sample_id"]
        partners = {p for p, _ in reader.partners.get(sid, [])}
        if sample["partner_valid"]:
            pid = sample["partner_id"]
            assert pid != sid and pid in partners and fetched == [sid, pid]
            assert real_read(pid) == tar_member_bytes(reader, pid)
            want = build_train_transform(SIZE, "none")(reader.read_image(pid))
            assert torch.equal(sample["partner_image"], want)
        else:
            assert not partners and not sample["partner_image"].any()


def test_val_split_disjoint_and_deterministic(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    val_percent = 30.0
    val = set(reader.split_ids("val", val_percent))
    train = set(reader.split_ids("train", val_percent))
    assert val and train and not val & train and val | train == set(reader.sample_ids())
    assert val == {s for s in reader.sample_ids() if is_val_sample(s, val_percent)}
    seen = []
    for world_size, rank in ((1, 0), (2, 0), (2, 1)):
        stream = CC4MTrainStream(reader, processor(reader, minilm_tokenizer, val_percent=val_percent), seed=1,
                                 rank=rank, world_size=world_size, val_percent=val_percent, epochs=1, shuffle_buffer=4)
        ids = [s["sample_id"] for s in stream]
        assert not set(ids) & val
        seen.append(ids)
    assert sorted(seen[0]) == sorted(train)
    assert sorted(seen[1] + seen[2]) == sorted(train) and not set(seen[1]) & set(seen[2])  # ranks: disjoint cover


def test_stream_is_deterministic_and_resume_skips(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)

    def batches(skip: int, n: int) -> list[dict]:
        stream = CC4MTrainStream(reader, processor(reader, minilm_tokenizer, augment="crop"), seed=5, batch_size=4,
                                 shuffle_buffer=8, skip_batches=skip)
        return list(itertools.islice(iter(make_train_loader(stream, 4)), n))

    full = batches(0, 9)  # more than one epoch (24 samples = 6 batches)
    resumed = batches(5, 4)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["answer_ids"], b["answer_ids"])
    epoch0 = torch.cat([b["sample_id"] for b in full[:6]]).tolist()
    assert sorted(epoch0) == reader.sample_ids()


def test_worker_split_with_dataloader_workers(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    stream = CC4MTrainStream(reader, processor(reader, minilm_tokenizer), seed=0, epochs=1, batch_size=2,
                             shuffle_buffer=4)
    ids = [i for b in make_train_loader(stream, 2, num_workers=2) for i in b["sample_id"].tolist()]
    assert sorted(ids) == reader.sample_ids()


def test_collate_and_eval_transform():
    samples = [{"image": torch.zeros(3, 4, 4), "has_entity": True, "sample_id": 3},
               {"image": torch.ones(3, 4, 4), "has_entity": False, "sample_id": 7}]
    b = collate(samples)
    assert b["image"].shape == (2, 3, 4, 4) and b["has_entity"].tolist() == [True, False]
    assert b["sample_id"].tolist() == [3, 7]
    from PIL import Image
    assert build_eval_transform(32)(Image.new("RGB", (80, 50))).shape == (3, 32, 32)


@pytest.mark.parametrize("augment", ["deit", "light", "crop", "none"])
def test_train_transforms_survive_many_draws(augment):
    # timm's "inc1" RandAugment (PosterizeIncreasing at magnitude 10 -> 0 bits) crashes under Pillow >= 13
    from PIL import Image

    from ovseg_core.data.loader import seeded_rng

    transform = build_train_transform(SIZE, augment)
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    for seed in range(400 if augment == "deit" else 5):
        with seeded_rng(seed):
            out = transform(image)
        assert out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all()


def test_repeat_factor_sampling_repeats_rare_classes_reproducibly(fixture_build, minilm_tokenizer):
    from ovseg_core.data.loader import class_repeat_factors, repeat_count

    factors = class_repeat_factors({1: ["people"], 2: ["people"], 3: ["people", "dog"], 4: []}, threshold=0.5)
    assert factors[1] == factors[2] == 1.0 and factors[4] == 1.0  # people in 3/4 > threshold: no repeat
    assert factors[3] == pytest.approx((0.5 / 0.25) ** 0.5)  # dog in 1/4: sqrt(t / f), the max over its classes
    with pytest.raises(ValueError, match="threshold"):
        class_repeat_factors({1: ["dog"]}, threshold=0.0)
    draws = [repeat_count(1.5, 0, epoch, 7) for epoch in range(200)]
    assert set(draws) == {1, 2} and 0.35 < draws.count(2) / 200 < 0.65 and repeat_count(2.0, 0, 0, 7) == 2
    assert draws == [repeat_count(1.5, 0, epoch, 7) for epoch in range(200)]

    reader = BuildReader(fixture_build)
    twice = {sid: 2.0 for sid in reader.sample_ids()[:5]}
    stream = CC4MTrainStream(reader, processor(reader, minilm_tokenizer, augment="crop"), seed=1, batch_size=4,
                             shuffle_buffer=8, epochs=1, repeat_factors=twice)
    ids = [i for b in make_train_loader(stream, 4) for i in b["sample_id"].tolist()]
    counts = {sid: ids.count(sid) for sid in set(ids)}
    assert all(counts.get(s, 0) == 2 for s in twice) and stream.counters["repeated"] == 5
    assert len(ids) == ((len(reader.sample_ids()) + 5) // 4) * 4  # drop_last of the one epoch


def test_trim_text_padding_keeps_real_tokens_only():
    from ovseg_core.data.loader import trim_text_padding

    ids = torch.tensor([[101, 5, 6, 102, 0, 0], [101, 7, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "answer_ids": ids[:, :3], "answer_mask": mask[:, :3],
             "image": torch.zeros(2, 3, 4, 4)}
    out = trim_text_padding(batch)
    assert out["input_ids"].shape == (2, 4) and torch.equal(out["input_ids"], ids[:, :4])
    assert out["attention_mask"].sum() == mask.sum() and out["answer_ids"].shape == (2, 3)
    assert out["image"] is batch["image"] and batch["input_ids"].shape == (2, 6)  # input untouched


def test_entity_targets_are_multi_hot_in_the_models_class_order(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    classes = ("bus", "dog", "people")
    processor = SampleProcessor(reader, minilm_tokenizer, 16, build_eval_transform(32), entity_classes=classes)
    assert processor.entity_targets(["people", "dog", "dog"]).tolist() == [0.0, 1.0, 1.0]
    assert processor.entity_targets([]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'sofa' is not a class"):
        processor.entity_targets(["sofa"])
    row = reader.meta_rows(reader.split_ids("train", 0.0))[0]
    out = processor(reader.read_jpeg(int(row["sample_id"])), {**row, "entities": ["bus"]}, seed=0)
    assert out["entity_targets"].tolist() == [1.0, 0.0, 0.0]
    plain = SampleProcessor(reader, minilm_tokenizer, 16, build_eval_transform(32))
    assert plain.entity_classes == ()


def test_training_refuses_a_build_without_a_valid_manifest(fixture_build, tmp_path):
    import json
    import shutil

    from ovseg_core.data.cc4m import InvalidBuild, check_build

    root = tmp_path / "build"
    shutil.copytree(fixture_build, root)
    manifest = check_build(root)
    assert manifest["counts"]["reshard"]["written"] == 24

    shard = min((root / "shards").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])  # a truncated shard
    with pytest.raises(InvalidBuild, match=f"shard {shard.name}"):
        check_build(root)
    assert check_build(root, shards_here=False)  # shards read from a URL are not looked for here

    (root / "manifest.json").write_text(json.dumps({**manifest, "counts": {}}))
    with pytest.raises(InvalidBuild, match="does not match its manifest"):
        check_build(root)
    (root / "manifest.json").unlink()
    with pytest.raises(InvalidBuild, match="not a finished CC4M build"):
        check_build(root)
