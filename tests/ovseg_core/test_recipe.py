"""The `paper` recipe (issue 17): dry-run plans, the DINO init, released names, fidelity switches, memory refusal."""
from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main as cc4m
from ovseg_core import create_model
from ovseg_core.data.cc4m import BuildReader
from ovseg_core.losses import contrastive_loss, mask_consistency_loss
from ovseg_core.models.checkpoint import load_checkpoint
from ovseg_core.models.visual_init import apply_visual_init, save_dino_shaped_checkpoint
from ovseg_core.train import memory
from ovseg_core.train.config import TrainConfig
from ovseg_core.train.loop import train
from ovseg_core.train.optim import param_groups
from ovseg_core.train.recipe import PLAN_KEYS, paper_config


def dry_run(capsys, build, out, *extra: str) -> dict:
    assert cc4m(["train", "--recipe", "paper", "--build", str(build), "--out", str(out), "--dry-run", *extra]) == 0
    captured = capsys.readouterr()
    assert "GiB per device" in captured.err  # the memory estimate, beside the plan
    return json.loads(captured.out)


@pytest.mark.parametrize("gpus", [8, 16])
def test_paper_dry_run_shows_the_release_values(fixture_build, tmp_path, capsys, gpus):
    train_samples = len(BuildReader(fixture_build).split_ids("train", 2.0))
    s1 = dry_run(capsys, fixture_build, tmp_path / "run", "--stage", "1", "--gpus", str(gpus))
    assert tuple(s1) == PLAN_KEYS
    assert (s1["world_size"], s1["global_batch"], s1["per_device_batch"]) == (gpus, 2048, 2048 // gpus)
    assert s1["epochs"] == 30 and s1["warmup_epochs"] == 2 and s1["weight_decay"] == 0.05
    assert s1["steps_per_epoch"] == pytest.approx(train_samples / 2048, abs=1e-4)
    assert s1["peak_lr"] == pytest.approx(3.2e-4) and s1["warmup_start_lr"] == pytest.approx(8e-6)
    assert s1["final_lr"] == pytest.approx(8e-5)
    assert s1["visual_init"] == "vit_base_patch16_224.dino" and s1["text_encoder"] == "bert-base-uncased"
    assert (s1["preset"], s1["image_size"], s1["max_text_len"], s1["text_frozen"]) == ("vit_b", 224, 77, False)
    assert s1["augment"]["name"] == "deit" and s1["augment"]["interpolation"] == "bilinear"
    assert s1["augment"]["random_erasing"] == 0.25
    assert s1["loss_weights"] == {"itc": 1.0, "mec": 1.0, "mask": 0.0, "entity_prompt": 0.0}
    assert s1["precision"] == "tf32" and s1["checkpoint_selection"] == "heldout-itc"

    s2 = dry_run(capsys, fixture_build, tmp_path / "run2", "--stage", "2", "--gpus", str(gpus))
    assert tuple(s2) == PLAN_KEYS
    assert (s2["global_batch"], s2["per_device_batch"], s2["epochs"]) == (1024, 1024 // gpus, 10)
    assert s2["peak_lr"] == pytest.approx(2.5e-6) and s2["warmup_start_lr"] == pytest.approx(2.5e-6)
    assert s2["final_lr"] == pytest.approx(2.5e-7) and s2["warmup_epochs"] == 0
    assert s2["text_frozen"] is True and s2["loss_weights"]["mask"] == 1.6
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()  # trains nothing, writes nothing


def test_global_batch_flag_rescales_and_is_recorded(fixture_build, tmp_path, capsys):
    plan = dry_run(capsys, fixture_build, tmp_path / "r", "--stage", "1", "--gpus", "8", "--global-batch", "512")
    assert (plan["global_batch"], plan["per_device_batch"]) == (512, 64)
    assert plan["peak_lr"] == pytest.approx(6.4e-4 * 512 / 4096)
    assert cc4m(["train", "--recipe", "paper", "--build", str(fixture_build), "--out", str(tmp_path / "x"),
                 "--gpus", "3", "--dry-run"]) == 2
    assert "does not split evenly over 3 devices" in capsys.readouterr().err


@pytest.mark.parametrize("init", [None, "/nonexistent/dino_vitb16.pth"])
def test_paper_run_without_a_reachable_init_stops_before_training(fixture_build, tmp_path, capsys, init):
    out = tmp_path / "run"
    args = ["train", "--recipe", "paper", "--preset", "tiny", "--build", str(fixture_build), "--out", str(out),
            "--global-batch", "4", "--steps", "1", "--device", "cpu"] + (["--visual-init", init] if init else [])
    assert cc4m(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--visual-init" in err
    assert (init or "vit_base_patch16_224.dino") in err
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints" / "last.pt").exists()


def dino_file(tmp_path, depth: int = 4):
    return save_dino_shaped_checkpoint(tmp_path / f"dino{depth}.pt", embed_dim=192, depth=depth, num_heads=4,
                                       patch_size=8, img_size=64)


def test_dino_init_follows_the_release_mapping_and_refuses_a_partial_one(tmp_path):
    src = torch.load(dino_file(tmp_path), weights_only=True)
    model = create_model("tiny", text_pretrained=False)
    report = apply_visual_init(model.visual, str(tmp_path / "dino4.pt"))
    own = model.visual.state_dict()
    assert torch.equal(own["blocks1.1.attn.qkv.weight"], src["blocks.1.attn.qkv.weight"])
    assert torch.equal(own["blocks2.0.mlp.fc1.weight"], src["blocks.2.mlp.fc1.weight"])  # block 2 -> stage 2
    assert torch.equal(own["patch_embed.proj.weight"], src["patch_embed.proj.weight"])
    assert torch.allclose(own["pos_embed"], src["pos_embed"][:, 1:])  # cls slot dropped, same 8x8 grid
    assert report["expected_missing"] == [] and report["unused"] == ["cls_token"]
    assert "group_token" in report["new"] and len(report["loaded"]) == report["expected"] + 2  # + final norm
    with pytest.raises(ValueError, match="refusing to train from a partial init"):
        apply_visual_init(create_model("tiny", text_pretrained=False).visual, str(dino_file(tmp_path, depth=3)))


def test_paper_recipe_trains_tiny_with_a_fake_dino_init_and_records_everything(fixture_build, tmp_path):
    cfg = paper_config(1, str(fixture_build), str(tmp_path / "run"), world_size=1, global_batch=4,
                       visual_init=str(dino_file(tmp_path)), preset="tiny", steps=2, device="cpu",
                       val_percent=20.0, max_text_len=24, shuffle_buffer=8, save_every=0, log_every=1,
                       model_overrides=(("text_pretrained", False),))
    result = train(cfg)
    run = tmp_path / "run"
    plan = json.loads((run / "run.json").read_text())
    assert tuple(plan) == PLAN_KEYS and plan["visual_init"].endswith("dino4.pt") and plan["world_size"] == 1
    report = json.loads((run / "visual_init.json").read_text())
    assert report["expected_missing"] == [] and len(report["loaded"]) == report["expected"] + 2
    ckpt = load_checkpoint(result.last_checkpoint)
    recorded = ckpt["train_config"]
    assert (recorded["precision"], recorded["bn_stats"], recorded["decay_logit_scale"]) == ("tf32", "release", True)
    assert (recorded["frozen_text_mode"], recorded["checkpoint_selection"]) == ("train", "heldout-itc")
    assert ckpt["extra"]["visual_init"]["loaded"] == len(report["loaded"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses) and result.final_step == 2


def test_released_config_names_are_refused_with_our_equivalent():
    with pytest.raises(ValueError, match="entity_prompt_weight") as err:
        create_model("tiny", text_pretrained=False, entity_weight=1.0)
    assert "\n" not in str(err.value) and "mec_weight" in str(err.value)
    with pytest.raises(ValueError, match="mec_weight"):
        TrainConfig.from_dict({"build_dir": "b", "out_dir": "o", "steps": 1, "use_entityloss": True})
    with pytest.raises(ValueError, match="released OVSegmentor"):
        TrainConfig(build_dir="b", out_dir="o", steps=1, model_overrides=(("entity_weight", 1.0),))


def test_logit_scale_decay_switch():
    model = create_model("tiny", text_pretrained=False)
    ours = param_groups(model, 0.05)
    release = param_groups(model, 0.05, decay_logit_scale=True)
    assert "logit_scale" in ours[1]["names"] and "logit_scale" in release[0]["names"]


def test_batchnorm_statistics_policy():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    counts = {}
    for policy in ("pooled", "release"):
        model = create_model("tiny", text_pretrained=False, bn_stats=policy).train()
        model.encode_image(images)
        counts[policy] = int(model.image_proj.bn.num_batches_tracked)
    assert counts == {"pooled": 1, "release": 2}  # the release also updates the statistics with the groups
    tok = create_model("tiny", text_pretrained=False).tokenize(["a dog", "a very long caption about a cat"])
    outs = {}
    for policy in ("pooled", "release"):
        torch.manual_seed(1)
        model = create_model("tiny", text_pretrained=False, bn_stats=policy).train()
        torch.manual_seed(2)
        outs[policy] = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert not torch.allclose(outs["pooled"], outs["release"])  # statistics over all token states, not [CLS] only


def test_frozen_text_mode_switch():
    for mode, training in (("eval", False), ("train", True)):
        model = create_model("tiny", text_pretrained=False)
        model.freeze_text_encoder(mode)
        model.train()
        assert model.text.model.training is training
        assert not any(p.requires_grad for p in model.text.model.parameters())


def test_losses_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).bfloat16()
    b = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).bfloat16()
    scale = torch.tensor(50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(a, b, scale)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, contrastive_loss(a.float(), b.float(), scale))
    m1, m2 = torch.randn(2, 4, 16, 16).bfloat16(), torch.randn(2, 4, 16, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dice = mask_consistency_loss(m1, m2, 0.6)
    assert dice.dtype == torch.float32
    assert torch.allclose(dice, mask_consistency_loss(m1.float(), m2.float(), 0.6))


def test_a_per_device_batch_that_does_not_fit_is_refused_with_the_memory_it_needs(monkeypatch):
    from ovseg_core.models._registry import get_model_config

    vit_b = get_model_config("vit_b")
    monkeypatch.setattr(memory, "device_memory_gib", lambda device: 80.0)
    fits = memory.check_fits(vit_b, 256, 1, "tf32", torch.device("cpu"))  # the release's 256 per A100-80G
    assert 30 < fits < 80
    with pytest.raises(MemoryError, match=r"per-device batch of 512 needs about \d+ GiB"):
        memory.check_fits(vit_b, 512, 1, "tf32", torch.device("cpu"))
    assert memory.estimate_train_memory_gib(vit_b, 256, 1, "bf16") < fits


def _tiny_voc_like(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = np.zeros((64, 64), np.uint8)
        label[16:48, 16:48] = 1
        Image.fromarray(label).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    (root / "classes.txt").write_text("background\ndog\ncat\n")


def test_release_checkpoint_selection_chooses_on_voc_val_miou(fixture_build, tmp_path):
    _tiny_voc_like(tmp_path / "voc")
    with pytest.raises(ValueError, match="needs selection_layout and selection_root"):
        TrainConfig(build_dir="b", out_dir="o", steps=1, checkpoint_selection="voc-val-miou")
    cfg = TrainConfig(build_dir=str(fixture_build), out_dir=str(tmp_path / "run"), preset="tiny", steps=2,
                      batch_size=4, augment="crop", max_text_len=24, val_percent=20.0, shuffle_buffer=8,
                      save_every=0, eval_every=1, device="cpu", checkpoint_selection="voc-val-miou",
                      selection_layout="sample", selection_root=str(tmp_path / "voc"), selection_max_images=2,
                      model_overrides=(("text_pretrained", False),))
    result = train(cfg)
    assert [("val_miou" in v, v["step"]) for v in result.val_history] == [(True, 1), (True, 2)]
    best = load_checkpoint(result.best_checkpoint)
    assert best["extra"]["checkpoint_selection"] == "voc-val-miou"
    assert best["extra"]["best_val"] == max(v["val_miou"] for v in result.val_history)
    assert result.best_val_itc is None  # not chosen on ITC


def test_several_gpus_go_through_torchrun(fixture_build, tmp_path, capsys, monkeypatch):
    from ovseg_core.train import cli as train_cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launched = []
    monkeypatch.setattr(train_cli.subprocess, "call", lambda cmd, env: launched.append(cmd) or 0)
    args = ["train", "--recipe", "paper", "--build", str(fixture_build), "--visual-init", "none", "--gpus", "4"]
    assert cc4m([*args, "--out", str(tmp_path / "one")]) == 0
    (cmd,) = launched
    assert "--nproc_per_node=4" in cmd and cmd[-4:] == ["-m", "ovseg_core.train.cli", "--config",
                                                         str(tmp_path / "one" / "train_config.json")]
    saved = TrainConfig.from_dict(json.loads((tmp_path / "one" / "train_config.json").read_text()))
    assert (saved.recipe, saved.batch_size, saved.visual_init) == ("paper", 2048, "none")
    assert cc4m([*args, "--nodes", "2", "--out", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "run on each node (node_rank 0..1" in err and "--nnodes=2" in err and len(err.strip().splitlines()) == 1
