"""Optimizer groups, LR schedule, checkpoints, resume equivalence and short training runs (stand-in model)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from c3_standin import StandInModel, standin_factory

from ovseg_core.models.checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from ovseg_core.train.config import STAGE_PRESETS, TrainConfig
from ovseg_core.train.loop import train
from ovseg_core.train.optim import CosineWarmupSchedule, build_optimizer, param_groups, scaled_lrs


def cfg_for(build, out, **kw) -> TrainConfig:
    base = {"build_dir": str(build), "out_dir": str(out), "preset": "standin", "steps": 6, "batch_size": 4,
            "base_lr": 1e-2, "warmup_lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2, "scale_lr": False,
            "augment": "crop", "max_text_len": 24, "val_percent": 20.0, "shuffle_buffer": 8, "log_every": 1,
            "save_every": 0}
    return TrainConfig.for_stage(kw.pop("stage", 1), **{**base, **kw})


def test_param_groups_exclude_the_right_params():
    groups = param_groups(StandInModel(), weight_decay=0.05)
    decay, no_decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"visual.0.weight", "visual.6.weight", "text_embed.weight", "text_proj.weight"} == decay
    assert {"visual.0.bias", "visual.4.weight", "visual.4.bias", "visual.6.bias", "pos_embed", "group_token",
            "logit_scale", "text_proj.bias"} == no_decay
    frozen = StandInModel()
    frozen.freeze_text_encoder()
    names = {n for g in param_groups(frozen, 0.05) for n in g["names"]}
    assert "text_embed.weight" not in names  # frozen parameters are not optimised at all


def test_lr_schedule_and_batch_scaling(tmp_path):
    cfg = TrainConfig.for_stage(1, build_dir="b", out_dir="o", steps=100, batch_size=1024)
    lrs = scaled_lrs(cfg)
    assert lrs.base == pytest.approx(6.4e-4 / 4) and lrs.warmup == pytest.approx(1.6e-5 / 4)
    assert lrs.min == pytest.approx(1.6e-4 / 4)
    assert scaled_lrs(TrainConfig.for_stage(1, build_dir="b", out_dir="o", steps=1, batch_size=4096)).base == 6.4e-4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = CosineWarmupSchedule(opt, total_steps=100, warmup_steps=10, lrs=lrs)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs.warmup)
    assert sched.lr_at(5) == pytest.approx(lrs.warmup + 0.5 * (lrs.base - lrs.warmup))
    assert sched.lr_at(10) == pytest.approx(lrs.base)
    assert sched.lr_at(55) == pytest.approx(lrs.min + 0.5 * (lrs.base - lrs.min))  # cosine midpoint
    assert sched.lr_at(100) == pytest.approx(lrs.min)
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs.base)
    s2 = TrainConfig.for_stage(2, build_dir="b", out_dir="o", steps=10, init_checkpoint="x.pt", scale_lr=False)
    assert (s2.base_lr, s2.min_lr, s2.warmup_epochs, s2.augment) == (1e-5, 1e-6, 0.0, "light")
    assert STAGE_PRESETS[1]["warmup_epochs"] == 2.0


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig(build_dir="b", out_dir="o")
    with pytest.raises(ValueError, match="init_checkpoint"):
        TrainConfig.for_stage(2, build_dir="b", out_dir="o", steps=1)
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(build_dir="b", out_dir="o", steps=1, augment="fancy")
    cfg = TrainConfig(build_dir="b", out_dir="o", steps=3, model_overrides=(("dim", 8),))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = StandInModel().eval()
    opt = build_optimizer(model, TrainConfig(build_dir="b", out_dir="o", steps=1))
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=7, optimizer=opt, metrics={"val_itc": 1.5},
                           train_config={"preset": "standin"}, build_manifest_sha256="abc")
    ckpt = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert ckpt["step"] == 7 and ckpt["metrics"] == {"val_itc": 1.5} and ckpt["build_manifest_sha256"] == "abc"
    assert ckpt["code_version"] and ckpt["model_config"]["name"] == "standin"
    loaded = load_model_from_checkpoint(path, factory=standin_factory)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_image(x).image_emb, loaded.encode_image(x).image_emb)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


class CrashingModel(StandInModel):
    """Raises on its 4th training step, after last.pt was written at step 3 (save_every=1)."""

    calls = 0

    def forward_train(self, batch, stage):
        CrashingModel.calls += 1
        if CrashingModel.calls == 4:
            raise RuntimeError("simulated crash")
        return super().forward_train(batch, stage)


def test_resume_continues_like_an_uninterrupted_run(fixture_build, tmp_path):
    full = train(cfg_for(fixture_build, tmp_path / "full"), model_factory=standin_factory)
    assert [r["step"] for r in full.losses] == [1, 2, 3, 4, 5, 6]
    CrashingModel.calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_for(fixture_build, tmp_path / "resumed", save_every=1), model_factory=lambda *a, **k: CrashingModel())
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = train(cfg_for(fixture_build, tmp_path / "resumed", save_every=1), model_factory=standin_factory)
    assert resumed.start_step == 3 and [r["step"] for r in resumed.losses] == [4, 5, 6]
    for a, b in zip(full.losses[3:], resumed.losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6) and a["lr"] == pytest.approx(b["lr"])
    wa = torch.load(full.last_checkpoint, weights_only=True)["model"]
    wb = torch.load(resumed.last_checkpoint, weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_rebuilt_build_never_resumes_the_old_run(fixture_build, tmp_path):
    import shutil

    build = tmp_path / "build"
    shutil.copytree(fixture_build, build)
    train(cfg_for(build, tmp_path / "run", steps=2), model_factory=standin_factory)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["code_version"] = "rebuilt"  # a new build of the folder: another manifest sha256
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="was trained on build manifest"):
        train(cfg_for(build, tmp_path / "run", steps=4), model_factory=standin_factory)


def test_training_updates_params_logs_and_selects_best(fixture_build, tmp_path):
    torch.manual_seed(0)  # train() seeds cfg.seed (0) before building the model: same initial weights
    before = standin_factory()
    result = train(cfg_for(fixture_build, tmp_path / "run", steps=8, eval_every=4), model_factory=standin_factory)
    assert all(math.isfinite(r["loss"]) for r in result.losses) and len(result.losses) == 8
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "val" in r]) == 2 and len([r for r in log if "loss" in r]) == 8
    assert result.best_checkpoint and result.val_history and "val_i2t_top1" in result.val_history[0]
    best = load_checkpoint(result.best_checkpoint)
    assert best["metrics"]["val_itc"] == pytest.approx(min(v["val_itc"] for v in result.val_history))
    after = load_model_from_checkpoint(result.last_checkpoint, factory=standin_factory)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert "visual.0.weight" in changed and "text_proj.weight" in changed
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 8


def test_stage2_freezes_text_and_updates_teacher(fixture_build, tmp_path):
    s1 = train(cfg_for(fixture_build, tmp_path / "s1", steps=2), model_factory=standin_factory)
    s2 = train(cfg_for(fixture_build, tmp_path / "s2", stage=2, steps=3, init_checkpoint=s1.last_checkpoint,
                       augment="light", base_lr=1e-2, min_lr=1e-3, warmup_lr=1e-2), model_factory=standin_factory)
    assert all("mask" in r and math.isfinite(r["mask"]) for r in s2.losses)
    w1 = load_checkpoint(s1.last_checkpoint)["model"]
    ck2 = load_checkpoint(s2.last_checkpoint)
    assert ck2["momentum_teacher"] and torch.equal(ck2["model"]["text_embed.weight"], w1["text_embed.weight"])
    assert not torch.equal(ck2["model"]["visual_teacher.0.weight"], w1["visual.0.weight"])  # EMA moved
    m = load_model_from_checkpoint(s2.last_checkpoint, factory=standin_factory)
    assert m.visual_teacher is not None



def test_stage2_keeps_a_saved_teacher_on_resume_and_on_init(fixture_build, tmp_path):
    """A stage-2 run restarted from its last.pt (resume) or started from a stage-2 checkpoint (init_checkpoint) must
    keep the saved EMA teacher, not replace it with a fresh copy of the online encoder."""
    s1 = train(cfg_for(fixture_build, tmp_path / "s1", steps=2), model_factory=standin_factory)
    s2_kw = {"stage": 2, "augment": "light", "base_lr": 1e-2, "min_lr": 1e-3, "warmup_lr": 1e-2,
             "init_checkpoint": s1.last_checkpoint, "momentum": 0.5}
    first = train(cfg_for(fixture_build, tmp_path / "s2", steps=3, **s2_kw), model_factory=standin_factory)
    saved = load_checkpoint(first.last_checkpoint)["model"]
    assert not torch.equal(saved["visual_teacher.0.weight"], saved["visual.0.weight"])  # teacher != online copy
    seen: list[dict[str, torch.Tensor]] = []

    class Recording(StandInModel):
        def forward_train(self, batch, stage):
            if not seen:  # the teacher and online weights at the first step after (re)starting
                seen.append({k: v.detach().clone() for k, v in self.state_dict().items()})
            return super().forward_train(batch, stage)

    resumed = train(cfg_for(fixture_build, tmp_path / "s2", steps=4, **s2_kw), model_factory=lambda *a, **k: Recording())
    assert resumed.start_step == 3
    assert torch.equal(seen[0]["visual_teacher.0.weight"], saved["visual_teacher.0.weight"])
    seen.clear()
    saved = load_checkpoint(resumed.last_checkpoint)["model"]  # the resumed run rewrote last.pt (step 4)
    train(cfg_for(fixture_build, tmp_path / "s2b", steps=1, **{**s2_kw, "init_checkpoint": resumed.last_checkpoint}),
          model_factory=lambda *a, **k: Recording())
    assert torch.equal(seen[0]["visual_teacher.0.weight"], saved["visual_teacher.0.weight"])

@pytest.mark.slow
def test_real_tiny_model_stage1_then_stage2(fixture_build, tmp_path):
    """Integration with the real OVSegmentor (C1): batches fit forward_train, checkpoints reload via create_model."""
    common = {"build_dir": str(fixture_build), "preset": "tiny", "batch_size": 4, "scale_lr": False,
              "max_text_len": 32, "val_percent": 20.0, "shuffle_buffer": 8, "save_every": 0}
    s1 = train(TrainConfig.for_stage(1, out_dir=str(tmp_path / "s1"), steps=2, warmup_steps=1, **common))
    assert all(math.isfinite(r["loss"]) and r["mec"] > 0 for r in s1.losses)
    s2 = train(TrainConfig.for_stage(2, out_dir=str(tmp_path / "s2"), steps=1, init_checkpoint=s1.best_checkpoint,
                                     **common))
    assert math.isfinite(s2.losses[0]["mask"])
    model = load_model_from_checkpoint(s2.last_checkpoint)
    assert model.visual_teacher is not None and not model.training
    with torch.no_grad():
        emb = model.encode_image(torch.randn(1, 3, model.image_size, model.image_size)).image_emb
    assert emb.shape == (1, model.cfg.embed_dim_out)
    ckpt = load_checkpoint(s2.last_checkpoint)
    assert ckpt["model_config"]["name"] == "tiny" and ckpt["train_config"]["stage"] == 2
    assert ckpt["build_manifest_sha256"] and len(ckpt["build_manifest_sha256"]) == 64


def test_frozen_text_cache_matches_eval_forward_and_counts_hits():
    from ovseg_core.config import MINILM_TEXT_MODEL
    from ovseg_core.models.text import TextEncoder
    from ovseg_core.train.text_cache import FrozenTextCache

    enc = TextEncoder(MINILM_TEXT_MODEL, num_layers=2, trainable_layers=0).train()  # train mode: dropout on
    with pytest.raises(ValueError, match="frozen"):
        FrozenTextCache(TextEncoder(MINILM_TEXT_MODEL, num_layers=1, trainable_layers=1))
    tok = enc.tokenizer(["a dog on a bus", "people", "a dog on a bus and a very long tail of words"], padding=True,
                        return_tensors="pt")
    enc.eval()
    with torch.no_grad():
        expected = enc(tok["input_ids"], tok["attention_mask"])
    enc.train()
    cache = FrozenTextCache(enc).install()
    first = enc(tok["input_ids"], tok["attention_mask"])
    again = enc(tok["input_ids"][[1, 0]], tok["attention_mask"][[1, 0]])  # hits, in another order
    real = tok["attention_mask"].bool()
    assert torch.allclose(first[real], expected[real], atol=1e-5) and (first[~real] == 0).all()
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    assert cache.stats()["text_cache_hits"] == 2 and cache.stats()["text_cache_misses"] == 3
    assert enc.model.training  # the caller's mode is restored
    cache.uninstall()
    assert "forward" not in enc.__dict__


def test_select_eval_settings_scores_candidates_on_the_selection_split(tmp_path):
    import shutil

    from test_evaluation import CODE_NORM, CodeModel, make_code_dataset

    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.evaluation.selection import candidate_grid, select_eval_settings

    make_code_dataset(tmp_path)
    split_dir = tmp_path / "ImageSets" / "Segmentation"
    shutil.copyfile(split_dir / "val.txt", split_dir / "train.txt")
    selection = load_dataset("sample", tmp_path, split="train")
    cands = {"bg_thresh": (0.0, 0.95), "topk": (1, None), "assignment": ("hard",), "scale": (1.0,), "refine": ("none",)}
    assert len(candidate_grid(cands)) == 4
    default = candidate_grid()  # every class (topk None) and 1.5x are choices by default
    assert {s["topk"] for s in default} == {1, 3, 5, None} and {s["scale"] for s in default} == {1.0, 1.5, 2.0}
    assert len(candidate_grid({**cands, "refine": ("none", "pamr")})) == 8
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_grid({"window": (3,)})
    out = select_eval_settings(CodeModel(), selection, cands, **CODE_NORM)
    assert out["split"] == "train" and out["n_candidates"] == 4 and len(out["scores"]) == 4
    # bg_thresh 0 leaves no background, so only 0.95 segments the code images perfectly; topk=1 keeps one class
    assert out["selection_mIoU"] == pytest.approx(1.0)
    assert out["chosen"] == {"bg_thresh": 0.95, "topk": None, "assignment": "hard", "short_side": 16, "window": 16,
                             "stride": 8, "refine": "none"}
    assert max(s["mIoU"] for s in out["scores"] if s["bg_thresh"] == 0.0) < 1.0
    with pytest.raises(ValueError, match="selection split"):
        select_eval_settings(CodeModel(), load_dataset("sample", tmp_path, split="val"), cands, **CODE_NORM)


def test_selection_reuses_forwards_and_scores_exactly_like_plain_evaluation(tmp_path):
    import shutil

    from test_evaluation import CODE_NORM, CodeModel, make_code_dataset

    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.evaluation.evaluate import evaluate
    from ovseg_core.evaluation.selection import evaluator_kwargs, select_eval_settings

    make_code_dataset(tmp_path)
    split_dir = tmp_path / "ImageSets" / "Segmentation"
    shutil.copyfile(split_dir / "val.txt", split_dir / "train.txt")
    selection = load_dataset("sample", tmp_path, split="train")

    class CountingModel(CodeModel):
        def __init__(self):
            super().__init__()
            self.image_calls = 0

        def encode_image(self, images):
            self.image_calls += 1
            return super().encode_image(images)

    cands = {"bg_thresh": (0.0, 0.5, 0.95), "topk": (1, None), "assignment": ("hard",), "scale": (1.0,),
             "refine": ("none", "pamr")}
    model = CountingModel()
    out = select_eval_settings(model, selection, cands, **CODE_NORM)
    swept = model.image_calls
    assert [(s["bg_thresh"], s["topk"], s["refine"]) for s in out["scores"]] == [
        (b, t, r) for b in (0.0, 0.5, 0.95) for t in (1, None) for r in ("none", "pamr")]
    for score in out["scores"]:
        model.image_calls = 0
        plain = evaluate(model, selection, n_overlays=0, **CODE_NORM, **evaluator_kwargs(model, score))
        assert plain["mIoU"] == score["mIoU"]  # memoised forwards and PAMR change nothing, bit for bit
    # twelve candidates share one forward per crop
    assert swept == model.image_calls
    # six PAMR candidates x (1 background + 3 class channels) per image; the memo refines 12 of those 48
    assert 6 * 4 * len(selection) == 48 and out["pamr_channels_refined"] == 12


def test_lr_scales_split_groups_and_scale_the_schedule():
    model = StandInModel()
    cfg = TrainConfig(build_dir="b", out_dir="o", steps=10, base_lr=1e-2, warmup_lr=1e-3, min_lr=1e-3, scale_lr=False,
                      lr_scales=(("text_proj.", 0.0), ("visual.0.", 0.5)))
    opt = build_optimizer(model, cfg)
    CosineWarmupSchedule(opt, total_steps=10, warmup_steps=0, lrs=scaled_lrs(cfg))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["text_proj.weight"])]["lr"] == 0.0
    assert by_param[id(named["visual.0.weight"])]["lr"] == pytest.approx(5e-3)
    assert by_param[id(named["visual.0.bias"])]["weight_decay"] == 0.0  # decay exclusions still apply
    assert by_param[id(named["text_embed.weight"])]["lr"] == pytest.approx(1e-2)
    before = named["text_proj.weight"].detach().clone()
    named["text_proj.weight"].grad = torch.ones_like(before)
    opt.step()
    assert torch.equal(named["text_proj.weight"], before)  # lr 0: neither update nor decoupled weight decay
    with pytest.raises(ValueError, match="lr_scales"):
        TrainConfig(build_dir="b", out_dir="o", steps=1, lr_scales=(("text.", -1.0),))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sample_recipe_trains_the_grouping_assignment_at_full_lr_and_the_rest_of_the_front_end_slower():
    from ovseg_core import create_model
    from ovseg_core.train.config import sample_recipe

    cfg = sample_recipe("b", "o", minutes=1.0)
    model = create_model(cfg.preset, text_pretrained=False, **dict(cfg.model_overrides))
    opt = build_optimizer(model, cfg)
    CosineWarmupSchedule(opt, total_steps=10, warmup_steps=0, lrs=scaled_lrs(cfg))
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assign = [n for n in named if n.startswith("visual.grouping.assign.")]
    front = [n for n in named if n.startswith(("visual.patch_embed.", "visual.blocks1.", "visual.grouping."))
             and n not in assign]
    assert {"visual.grouping.assign.q_proj.weight", "visual.grouping.assign.k_proj.weight"} <= set(assign) and front
    assert all(by_param[id(named[n])] == pytest.approx(cfg.base_lr) for n in assign)
    assert all(by_param[id(named[n])] == pytest.approx(0.3 * cfg.base_lr) for n in front)
    assert by_param[id(named["visual.blocks2.0.mlp.fc1.weight"])] == pytest.approx(cfg.base_lr)


def test_sample_recipe_sizes_the_run_to_the_budget_and_takes_overrides():
    from ovseg_core.train.config import SAMPLE_RECIPE, sample_recipe

    cfg = sample_recipe("b", "o", minutes=2.0, step_seconds=0.5)
    assert cfg.steps == 240 and cfg.time_limit_s == 120.0 and cfg.warmup_steps == 16
    assert not cfg.scale_lr and cfg.augment == "none" and cfg.cache_frozen_text and cfg.stage == 1
    model = dict(cfg.model_overrides)
    assert model["text_trainable_layers"] == 0 and model["unclaimed_group_weight"] == 1.0
    assert model["entity_logit_adjust"] == 1.0 and model["patch_embed"] == "conv"
    assert (model["patch_size"], model["embed_dim"], model["num_heads"]) == (4, 96, 3)  # the fine grid
    assert cfg.repeat_threshold == SAMPLE_RECIPE["repeat_threshold"]
    assert sample_recipe("b", "o", steps=7, seed=3).steps == 7 and sample_recipe("b", "o", seed=3).seed == 3
    assert sample_recipe("b", "o", epochs=2.0).epochs == 2.0
    with pytest.raises(ValueError, match="minutes"):
        sample_recipe("b", "o", minutes=0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_reports_progress_to_callback_log_and_progress_file(fixture_build, tmp_path, capsys):
    from ovseg_core.train.loop import Progress

    seen: list[Progress] = []
    cfg = cfg_for(fixture_build, tmp_path / "run", steps=7, log_every=3)
    train(cfg, model_factory=standin_factory, progress=seen.append)
    # first step, every 3rd step and the last one
    assert [p.step for p in seen] == [1, 3, 6, 7]
    assert all(p.total_steps == 7 and p.samples_per_s > 0 and math.isfinite(p.loss) for p in seen)
    assert seen[-1].eta_s == 0 and seen[-1].fraction == 1.0 and seen[0].eta_s > 0
    # ETA = remaining steps / measured rate
    p = seen[1]
    assert p.eta_s == pytest.approx((7 - 3) * cfg.batch_size / p.samples_per_s, rel=1e-6)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    with_rate = [r["step"] for r in records if "samples_per_s" in r]
    assert with_rate == [1, 3, 6, 7]
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["step"] == 7
    out = capsys.readouterr().out
    assert "step 3/7" in out and "samples/s" in out and "ETA 0:00:00" in out
