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
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from c3_standin import StandInConfig, StandInModel, standin_factory

from ovseg_core.train.distributed import DistInfo, wrap_ddp
from ovseg_core.train.loop import TrainStep

BATCH, LEN = 8, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
