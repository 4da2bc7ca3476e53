"""Cheaper input pipeline: JPEG draft decoding, batched tokenization in the collate, and the device-decode path
(run here with device="cpu") against the PIL path."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core.data.cc4m import BuildReader
from ovseg_core.data.device_decode import decode_on_device
from ovseg_core.data.loader import CC4MTrainStream, SampleProcessor, collate, make_train_loader, seeded_rng
from ovseg_core.data.transforms import IMAGENET_STD, apply_to_jpeg, build_train_transform

MAX_LEN = 24


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Smooth gradients + noise (real-photo-like JPEG statistics, unlike flat test squares)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = (rng.uniform(60, 200, 3)[None, None] + 50 * np.sin(x[..., None] / rng.uniform(15, 40))
           + 40 * np.cos(y[..., None] / rng.uniform(15, 40)) + rng.normal(0, 10, (height, width, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised images in 8-bit grey levels."""
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((a - b).abs() * std * 255).reshape(-1)


@pytest.mark.parametrize("augment", ["light", "deit"])
def test_draft_crop_draws_the_same_box_and_stays_close_to_the_full_decode(augment):
    jpeg = photo_jpeg(320, 256)
    plain, draft = build_train_transform(64, augment, draft=False), build_train_transform(64, augment)
    diffs = []
    for seed in range(12):
        with seeded_rng(seed):
            a = apply_to_jpeg(plain, jpeg)
        with seeded_rng(seed):
            b = apply_to_jpeg(draft, jpeg)
        assert a.shape == b.shape == (3, 64, 64)
        diffs.append(levels(a, b))
    d = torch.cat(diffs)
    # same crops and colour draws; only the DCT-scaled decode differs (measured: mean ~1-2 levels)
    assert d.mean() < 4.0 and torch.quantile(d, 0.99) < 30


def test_draft_decodes_a_smaller_image_only_when_the_box_allows():
    jpeg = photo_jpeg(512, 512)
    small = build_train_transform(64, "light").transforms[0]  # boxes >= 0.4 of 512^2: >= 2x the 64 px output
    im = Image.open(io.BytesIO(jpeg))
    small(im)
    assert im.size[0] <= 256 and im.size[1] <= 256  # decoded at 1/2 or less
    large = build_train_transform(448, "light").transforms[0]
    im = Image.open(io.BytesIO(jpeg))
    out = large(im)
    assert im.size == (512, 512) and out.size == (448, 448)
    with seeded_rng(3):  # a box that needs full resolution gives exactly the undrafted result
        a = apply_to_jpeg(build_train_transform(448, "light"), jpeg)
    with seeded_rng(3):
        b = apply_to_jpeg(build_train_transform(448, "light", draft=False), jpeg)
    assert torch.equal(a, b)


def _processor(reader, tok, stage, **kwargs):
    return SampleProcessor(reader, tok, MAX_LEN, build_train_transform(32, "light"), stage=stage,
                           partner_transform=build_train_transform(32, "light"), **kwargs)


@pytest.mark.parametrize("stage", [1, 2])
def test_batched_tokenization_gives_the_per_sample_tensors(fixture_build, minilm_tokenizer, stage):
    reader = BuildReader(fixture_build)
    batches = []
    for batch_text in (False, True):
        stream = CC4MTrainStream(reader, _processor(reader, minilm_tokenizer, stage, batch_text=batch_text),
                                 seed=0, epochs=1, shuffle_buffer=8, batch_size=6)
        batches.append(list(make_train_loader(stream, 6)))
    assert len(batches[0]) == len(batches[1]) == 4
    for a, b in zip(*batches, strict=True):
        assert set(a) == set(b) and "text" not in b
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stage", [1, 2])
def test_device_decode_matches_the_pil_path(fixture_build, minilm_tokenizer, stage):
    reader = BuildReader(fixture_build)
    out = {}
    for device_decode in (False, True):
        proc = SampleProcessor(reader, minilm_tokenizer, MAX_LEN, build_train_transform(32, "light", draft=False),
                               stage=stage, partner_transform=build_train_transform(32, "light", draft=False),
                               batch_text=True, device_decode=device_decode)
        stream = CC4MTrainStream(reader, proc, seed=0, epochs=1, shuffle_buffer=8, batch_size=8)
        out[device_decode] = [decode_on_device(b, "cpu") for b in make_train_loader(stream, 8)]
    for pil, dev in zip(out[False], out[True], strict=True):
        assert set(pil) == set(dev)
        for key in pil:
            if key not in ("image", "partner_image"):
                assert torch.equal(pil[key], dev[key]), key
        for key in ("image", "partner_image") if stage == 2 else ("image",):
            assert dev[key].shape == pil[key].shape and dev[key].dtype == torch.float32
            d = levels(pil[key], dev[key])
            # same boxes and flips; PIL vs torchvision bicubic resampling differ by rounding and edge handling
            assert d.mean() < 1.5 and torch.quantile(d, 0.99) < 12, key
        if stage == 2:
            missing = ~dev["partner_valid"]
            assert (dev["partner_image"][missing] == 0).all()


def test_device_decode_refuses_deit_and_keeps_bytes_in_lists(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    proc = SampleProcessor(reader, minilm_tokenizer, MAX_LEN, build_train_transform(32, "deit"), device_decode=True)
    sid = reader.sample_ids()[0]
    info = {"sample_id": sid, "caption": "a photo", "entity_words": []}
    with pytest.raises(ValueError, match="RandAugment"):
        proc(reader.read_jpeg(sid), info, seed=1)
    ok = SampleProcessor(reader, minilm_tokenizer, MAX_LEN, build_train_transform(32, "crop"), device_decode=True)
    samples = [ok(reader.read_jpeg(s), {**info, "sample_id": s}, seed=s) for s in reader.sample_ids()[:3]]
    batch = collate(samples)
    assert isinstance(batch["jpeg"], list) and batch["crop"].shape == (3, 7)
    assert bytes(batch["jpeg"][1].numpy()) == reader.read_jpeg(reader.sample_ids()[1])


def _webdataset_samples(path) -> list[dict]:
    import webdataset as wds

    with open(path, "rb") as stream:
        return list(wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])))


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_shard_reader_groups_members_as_webdataset_does(tmp_path, fmt):
    import tarfile

    from ovseg_core.data.cc4m import shard_samples

    path = tmp_path / f"{fmt}.tar"
    tar_format = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    deep = "d" * 60 + "/" + "e" * 60 if fmt != "ustar" else "dir"  # > 100 characters: GNU long name / pax path
    members = [("000001.jpg", b"\xff\xd8jpeg"), ("000001.json", b"{}"), ("000001.TXT", b"cap"),
               ("__index__", b"meta"), (f"{deep}/000002.jpg", b"x" * 1500), (f"{deep}/000002.json", b"{\"a\": 1}"),
               ("000003.json", b"")]
    with tarfile.open(path, "w", format=tar_format) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = list(shard_samples(str(path)))
    assert ours == _webdataset_samples(path)
    assert [s["__key__"] for s in ours] == ["000001", f"{deep}/000002", "000003"] and ours[0]["txt"] == b"cap"


def test_shard_reader_refuses_a_truncated_shard(tmp_path, fixture_build):
    from ovseg_core.data.cc4m import shard_samples

    shard = min((fixture_build / "shards").glob("*.tar"))
    assert list(shard_samples(str(shard))) == _webdataset_samples(shard)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:1700])  # mid-way through a member's bytes
    with pytest.raises(ValueError, match="truncated"):
        list(shard_samples(str(cut)))


def test_jpeg_size_reads_the_frame_header_like_pil():
    from ovseg_core.data.device_decode import jpeg_size

    rgb = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    cases = []
    for kwargs in ({}, {"progressive": True}, {"exif": Image.Exif().tobytes() or b"Exif\0\0"}, {"quality": 20}):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", **kwargs)
        cases.append(buf.getvalue())
    gray = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(gray, format="JPEG")
    cases += [gray.getvalue(), photo_jpeg(320, 256)]
    for data in cases:
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
    with pytest.raises(Exception):  # not a JPEG: PIL names the fault
        jpeg_size(b"not an image at all")


def test_training_runs_on_device_decoded_batches(fixture_build, tmp_path):
    import json
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from c3_standin import standin_factory

    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.loop import train

    base = {"build_dir": str(fixture_build), "preset": "standin", "steps": 4, "batch_size": 4, "base_lr": 1e-2,
            "warmup_lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 1, "scale_lr": False, "augment": "crop",
            "max_text_len": 24, "val_percent": 0.0, "shuffle_buffer": 8, "log_every": 1, "save_every": 0}
    losses = {}
    for gpu_decode in (False, True):
        out = tmp_path / f"gpu_decode_{gpu_decode}"
        torch.manual_seed(0)
        result = train(TrainConfig(**base, out_dir=str(out), gpu_decode=gpu_decode), model_factory=standin_factory)
        losses[gpu_decode] = [r["loss"] for r in result.losses]
        assert json.loads((out / "train_config.json").read_text())["gpu_decode"] is gpu_decode
    assert len(losses[True]) == 4 and all(math.isfinite(x) for x in losses[True])
    # same samples, crops and noise; only the decoders' rounding differs
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    with pytest.raises(ValueError, match="gpu_decode supports"):
        TrainConfig(**{**base, "augment": "deit"}, out_dir=str(tmp_path / "x"), gpu_decode=True)
