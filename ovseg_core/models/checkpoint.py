"""Atomic checkpoints that load with `torch.load(..., weights_only=True)` (plain tensors, numbers, strings, lists).

A checkpoint records: model state (including the stage-2 momentum teacher when it exists), model config, train config,
optimizer + scheduler state, step, metrics, RNG states, the build manifest's sha256 and the code version.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manifests.fileio import atomic_path
from manifests.version import code_version
from ovseg_core.models._factory import create_model

CHECKPOINT_FORMAT = "cc4m-ovseg-checkpoint-v1"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The OVSegmentor inside DDP / train-step wrappers."""
    while hasattr(model, "module") or hasattr(model, "ovseg"):
        model = getattr(model, "module", None) or model.ovseg
    return model


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], [int(x) for x in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_teacher(model: nn.Module) -> bool:
    """Whether the stage-2 EMA teacher exists (OVSegmentor.visual_teacher; its weights are in the state dict)."""
    if getattr(model, "visual_teacher", None) is not None:
        return True
    return any(k.startswith("visual_teacher.") for k in model.state_dict())


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else {}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    # The project's one atomic write (manifests.fileio): readers see the old file or the new one, never a partial one.
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    step: int,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    metrics: dict[str, float] | None = None,
    build_manifest_sha256: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    model = unwrap(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model_config_dict(model),
        "momentum_teacher": has_teacher(model),
        "train_config": train_config or {},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "rng": rng_state(),
        "build_manifest_sha256": build_manifest_sha256,
        "code_version": code_version(),
        "extra": extra or {},
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict[str, Any], strict: bool = True) -> None:
    """Load weights into `model`, creating the momentum teacher first if the checkpoint has one."""
    model = unwrap(model)
    if ckpt.get("momentum_teacher") and not has_teacher(model) and hasattr(model, "init_momentum_teacher"):
        model.init_momentum_teacher()
    model.load_state_dict(ckpt["model"], strict=strict)


def recorded_model(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> tuple[str, dict[str, Any]]:
    """(preset name, model config overrides) recorded in a loaded checkpoint, ready for create_model. The
    `visual_init` is dropped (the checkpoint holds the trained weights; the init file need not exist here), and our
    own checkpoints from before the rename get `entity_weight` as `entity_prompt_weight`."""
    cfg = dict(ckpt["model_config"])
    if not cfg:
        raise ValueError(f"{path} records no model config")
    if "entity_weight" in cfg:  # there it was the entity-prompt weight (never the released MEC weight)
        cfg["entity_prompt_weight"] = cfg.pop("entity_weight")
    name = cfg.pop("name", None) or ckpt["train_config"].get("preset", "tiny")
    if cfg.get("visual_init") is not None:
        cfg["visual_init"] = None
    return name, cfg


def load_model_from_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", factory: Any | None = None
) -> nn.Module:
    """Rebuild the OVSegmentor recorded in a checkpoint (`recorded_model`) and load its weights (eval mode).

    `factory(name, **config)` defaults to create_model (tests pass stand-ins). The train config in the checkpoint
    still names the visual init, for lineage.
    """
    ckpt = load_checkpoint(path, map_location)
    name, cfg = recorded_model(ckpt, path)
    model = (factory or create_model)(name, **cfg)
    load_model_state(model, ckpt)
    return model.eval()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    path = Path(out_dir) / "checkpoints" / LAST_NAME
    return path if path.exists() else None
