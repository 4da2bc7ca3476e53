"""DDP on CPU (gloo, 2 processes): one step over a global batch split on 2 ranks == one single-process step.

What makes the equality exact (and what a real run differs in):
- the stand-in's contrastive losses are over the GLOBAL batch with gradient-carrying all_gather
  (ovseg_core.train.distributed.all_gather_with_grad); DDP averages the per-rank gradients;
- no dropout / drop-path / augmentation randomness (dropout=0, fixed tensors);
- no train-mode BatchNorm: on CPU there is no SyncBatchNorm, so BN would normalise with per-rank statistics. On CUDA
  wrap_ddp converts BN to SyncBatchNorm, which restores global-batch statistics.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from c3_standin import StandInConfig, StandInModel, standin_factory

from flows.local import free_port
from ovseg_core.train.distributed import DistInfo, wrap_ddp
from ovseg_core.train.loop import TrainStep

BATCH, LEN = 8, 12


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(1000, 2000, (BATCH, LEN), generator=g)
    mask = torch.ones(BATCH, LEN, dtype=torch.long)
    mask[:, LEN // 2:] = torch.randint(0, 2, (BATCH, LEN - LEN // 2), generator=g)
    return {"image": torch.randn(BATCH, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "question_ids": ids.flip(1), "question_mask": mask.flip(1), "answer_ids": ids[:, :4],
            "answer_mask": mask[:, :4], "has_entity": torch.ones(BATCH, dtype=torch.bool)}


def grads_after_one_step(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = StandInModel(StandInConfig(dropout=0.0))
    step = wrap_ddp(TrainStep(model), torch.device("cpu"), DistInfo(rank, world_size, rank))
    per_rank = BATCH // world_size
    batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in make_batch().items()}
    out = step(batch, 1)
    out["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, build: str, out: str) -> None:
    """One spawn (process start-up dominates the cost) runs both checks: a bare DDP step, then train()."""
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.distributed import cleanup
    from ovseg_core.train.loop import train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # env:// init, as under torchrun
    torch.save(grads_after_one_step(rank, world_size), os.path.join(out, f"grads{rank}.pt"))
    cfg = TrainConfig(build_dir=build, out_dir=os.path.join(out, "run"), preset="standin", steps=4, batch_size=8,
                      base_lr=1e-2, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=1, scale_lr=False, augment="crop",
                      max_text_len=24, val_percent=20.0, shuffle_buffer=4, eval_every=2, save_every=0, device="cpu")
    result = train(cfg, model_factory=standin_factory)  # joins the existing process group
    torch.save({"losses": [r["loss"] for r in result.losses], "final_step": result.final_step},
               os.path.join(out, f"rank{rank}.pt"))
    cleanup()


@pytest.fixture(scope="module")
def two_rank_outputs(fixture_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(fixture_build), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.slow
def test_ddp_step_matches_single_process(two_rank_outputs):
    single = grads_after_one_step(0, 1)
    for rank in (0, 1):
        ddp = torch.load(two_rank_outputs / f"grads{rank}.pt", weights_only=True)
        assert set(ddp) == set(single)
        for name, g in single.items():
            assert torch.allclose(ddp[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_train_loop_under_two_ranks(two_rank_outputs):
    r0 = torch.load(two_rank_outputs / "rank0.pt", weights_only=True)
    r1 = torch.load(two_rank_outputs / "rank1.pt", weights_only=True)
    assert r0["final_step"] == r1["final_step"] == 4
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])
    assert r0["losses"] == pytest.approx(r1["losses"])  # global-batch loss: identical on both ranks
    run = two_rank_outputs / "run"
    assert (run / "checkpoints" / "last.pt").exists() and (run / "checkpoints" / "best.pt").exists()


# ------------------------------------------------------------------------------- the real `tiny` model, 2 ranks
# Rows 0-3 go to rank 0, rows 4-7 to rank 1: rank 0 holds 4 rows with an entity and 3 with a partner, rank 1 holds
# 1 and 1. A per-rank mean over each rank's valid rows would weigh rank 1's single rows 3-4x too much.
REAL_HAS_ENTITY = (True, True, True, True, True, False, False, False)
REAL_PARTNER_VALID = (True, True, True, False, False, False, False, True)
REAL_STEPS = {1: 2, 2: 2}  # optimizer steps per stage


def real_batch(tokenizer, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    words = ["dog", "bus", "people", "cat", "car", "sofa", "sheep", "glass"]
    captions = [f"a {w} next to a {words[(i + 3) % 8]} in the park" for i, w in enumerate(words)]

    def enc(texts):
        t = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    batch = {"image": torch.randn(BATCH, 3, size, size, generator=g),
             "partner_image": torch.randn(BATCH, 3, size, size, generator=g),
             "has_entity": torch.tensor(REAL_HAS_ENTITY), "partner_valid": torch.tensor(REAL_PARTNER_VALID)}
    batch["input_ids"], batch["attention_mask"] = enc(captions)
    batch["question_ids"], batch["question_mask"] = enc([c.replace(w, "[MASK]", 1) for c, w in zip(captions, words)])
    batch["answer_ids"], batch["answer_mask"] = enc([f"a photo of a {w}" for w in words])
    batch["shared_ids"], batch["shared_mask"] = enc([f"a photo of a {w}." for w in words])
    return batch


def train_real_tiny(rank: int, world_size: int) -> dict[str, object]:
    """A few SGD steps of the real `tiny` model per stage on this rank's share of the global batch; returns the
    gradients of every step, the losses and the final weights. Gumbel noise is zeroed (ranks draw their own noise,
    so noisy runs cannot be compared row by row) and dropout is off; everything else is the training path.

    In float64: after a few SGD steps at this lr, float32 rounding of sums taken in another order had grown to 1.5e-4
    of a gradient's norm on an AVX-512 machine (the tolerance was 1e-4), so float32 cannot tell drift from a small
    bug. In float64 the drift stays near 1e-12 and the tolerance can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _train_real_tiny(rank, world_size)
    finally:
        torch.set_default_dtype(previous)


def _train_real_tiny(rank: int, world_size: int) -> dict[str, object]:
    from ovseg_core import create_model
    from ovseg_core.layers import grouping

    grouping.gumbel_noise = lambda shape, device, generator=None: torch.zeros(shape, device=device)
    torch.manual_seed(0)
    model = create_model("tiny").double()  # the text encoder loads as float32 whatever the default dtype
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    full = real_batch(model.tokenizer, model.image_size)
    per_rank = BATCH // world_size
    batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}
    grads, losses = [], []
    for stage in (1, 2):
        if stage == 2:
            model.freeze_text_encoder()
            model.init_momentum_teacher()
        step = wrap_ddp(TrainStep(model), torch.device("cpu"), DistInfo(rank, world_size, rank))
        step.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05)
        for _ in range(REAL_STEPS[stage]):
            opt.zero_grad(set_to_none=True)
            out = step(batch, stage)
            out["loss"].backward()
            losses.append({k: float(v.detach()) for k, v in out.items()})
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            if stage == 2:
                model.momentum_update(0.9)
    return {"grads": grads, "losses": losses,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _real_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(train_real_tiny(rank, world_size), os.path.join(out, f"real{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_tiny_two_ranks_with_unequal_valid_rows_match_one_process(tmp_path, monkeypatch):
    mp.spawn(_real_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    from ovseg_core.layers import grouping

    monkeypatch.setattr(grouping, "gumbel_noise", grouping.gumbel_noise)  # restored after train_real_tiny patches it
    single = train_real_tiny(0, 1)
    assert len(single["grads"]) == sum(REAL_STEPS.values())
    assert all(s["mec"] > 0 and s["itc"] > 0 for s in single["losses"])
    assert all(s["mask"] > 0 for s in single["losses"][REAL_STEPS[1]:])  # stage 2 really trains the mask loss
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"real{rank}.pt", weights_only=True)
        for i, (got, want) in enumerate(zip(ddp["losses"], single["losses"], strict=True)):
            for key in ("loss", "itc", "mec", "mask"):  # every rank reports the global-batch value
                assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), (rank, i, key)
        for i, (got, want) in enumerate(zip(ddp["grads"], single["grads"], strict=True)):
            assert set(got) == set(want), i
            # float64 sums run in another order (measured: at most 6e-12 apart): 1e-8 of the tensor's norm, plus 1e-10
            # absolute for gradients that are zero in exact arithmetic (e.g. biases a LayerNorm cancels)
            for name, g in want.items():
                err = (got[name] - g).norm().item()
                assert err <= 1e-8 * g.norm().item() + 1e-10, (rank, i, name, err, g.norm().item())
        for name, w in single["weights"].items():
            if w.is_floating_point():
                assert torch.allclose(ddp["weights"][name], w, rtol=1e-8, atol=1e-10), (rank, name)
