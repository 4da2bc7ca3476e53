"""`cc4m train` (wired in flows/cli.py) and the per-rank entry point torchrun runs:

    cc4m train --recipe paper --stage 1 --gpus 8 --build DIR --out DIR --dry-run      prints the run plan (JSON)
    cc4m train --recipe paper --stage 1 --gpus 8 --build DIR --out DIR                trains (torchrun on 1 node)
    python -m ovseg_core.train.cli --config OUT/train_config.json                     one rank (torchrun runs it)

Recipes: "paper" (ovseg_core.train.recipe, the released run), "sample" (the CPU recipe of the embedded sample,
sized by --minutes), "custom" (the stage preset; --steps or --epochs required). Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ovseg_core.train.config import FIDELITY_CHOICES, TrainConfig
from ovseg_core.train.recipe import RECIPES

TORCHRUN_PORT = 29500
DRY_RUN_STAGE1 = "<the stage-1 checkpoint: --init-checkpoint>"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", required=True, help="build folder (shards/, meta/, index/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl); resumes if it has last.pt")
    p.add_argument("--recipe", choices=RECIPES, default="custom",
                   help="paper = the released CC4M run (docs/training.md); sample = the CPU recipe of the embedded "
                        "sample (sized by --minutes; stage 1); custom = the stage preset (--steps/--epochs)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved run as JSON; train nothing")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--preset", help="model preset: tiny, vit_s, vit_b (default: vit_b for paper, else tiny)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (the global batch is split over all)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--global-batch", "--batch-size", dest="global_batch", type=int,
                   help="GLOBAL batch (default: the recipe's; paper: 2048 / 1024; custom: 32); rescales the lrs")
    p.add_argument("--text-model", help="text encoder: a local folder or HF-cache name (default: the preset's; "
                                        "vit_b: bert-base-uncased, never downloaded)")
    p.add_argument("--visual-init", help="image-encoder init: timm name, local state-dict file, or 'none' "
                                         "(paper default: vit_base_patch16_224.dino)")
    p.add_argument("--init-checkpoint", help="stage 2: the stage-1 checkpoint to start from")
    p.add_argument("--minutes", type=float, default=10.0, help="--recipe sample: wall-clock training budget")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=float)
    _add_fidelity_arguments(p)
    _add_tuning_arguments(p)


def _add_fidelity_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fidelity switches (default: the recipe's; all recorded)")
    g.add_argument("--precision", choices=FIDELITY_CHOICES["precision"])
    g.add_argument("--bn-stats", choices=FIDELITY_CHOICES["bn_stats"])
    g.add_argument("--decay-logit-scale", choices=("yes", "no"))
    g.add_argument("--frozen-text-mode", choices=FIDELITY_CHOICES["frozen_text_mode"])
    g.add_argument("--checkpoint-selection", choices=FIDELITY_CHOICES["checkpoint_selection"])
    g.add_argument("--selection-layout", help="voc-val-miou: dataset layout (e.g. voc)")
    g.add_argument("--selection-root", help="voc-val-miou: dataset folder")
    g.add_argument("--interpolation", choices=FIDELITY_CHOICES["interpolation"])


def _add_tuning_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeat-threshold", type=float, help="repeat-factor sampling over caption classes (e.g. 0.1)")
    p.add_argument("--cache-frozen-text", action="store_true", help="encode each text once when the text is frozen")
    p.add_argument("--lr", type=float, help="base lr (default: the recipe's)")
    p.add_argument("--warmup-lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--no-lr-scaling", action="store_true", help="custom: do not scale lrs by global batch / 4096")
    p.add_argument("--augment", choices=("deit", "light", "crop", "none"), help="default: the stage preset")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-percent", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-text-len", type=int)
    p.add_argument("--shard-base-url", help="read shards from this http(s)/fsspec folder (meta and index stay local)")
    p.add_argument("--partner-source", choices=("buffer", "locator"), default="buffer",
                   help="stage-2 partners from the shuffle buffer (locator fallback) or always via the locator")
    p.add_argument("--shuffle-buffer", type=int, default=4096)
    p.add_argument("--shards-in-flight", type=int, default=16)
    p.add_argument("--time-limit", type=float, help="stop (and checkpoint) after this many seconds")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the forward + losses (auto: on CUDA only; ovseg_core.train.compiled)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode and crop the JPEGs on the training device (light/crop augmentations)")


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, object]:
    """{TrainConfig field: value} for the flags the user gave (None = not given)."""
    return {field: getattr(args, flag) for field, flag in names.items() if getattr(args, flag) is not None}


def _fidelity(args: argparse.Namespace) -> dict[str, object]:
    out = _given(args, {"precision": "precision", "bn_stats": "bn_stats", "frozen_text_mode": "frozen_text_mode",
                        "checkpoint_selection": "checkpoint_selection", "selection_layout": "selection_layout",
                        "selection_root": "selection_root", "interpolation": "interpolation"})
    if args.decay_logit_scale is not None:
        out["decay_logit_scale"] = args.decay_logit_scale == "yes"
    return out


def _common(args: argparse.Namespace) -> dict[str, object]:
    return {
        "device": args.device, "num_workers": args.num_workers, "threads": args.threads, "seed": args.seed,
        "val_percent": args.val_percent, "eval_every": args.eval_every, "save_every": args.save_every,
        "log_every": args.log_every, "time_limit_s": args.time_limit, "resume": not args.no_resume,
        "repeat_threshold": args.repeat_threshold, "cache_frozen_text": args.cache_frozen_text,
        "shard_base_url": args.shard_base_url, "partner_source": args.partner_source,
        "shuffle_buffer": args.shuffle_buffer, "shards_in_flight": args.shards_in_flight,
        "compile": args.compile, "gpu_decode": args.gpu_decode,
        **_given(args, {"base_lr": "lr", "warmup_lr": "warmup_lr", "min_lr": "min_lr", "augment": "augment",
                        "warmup_steps": "warmup_steps", "max_text_len": "max_text_len", "steps": "steps",
                        "epochs": "epochs", "init_checkpoint": "init_checkpoint", "preset": "preset"}),
        **_fidelity(args),
        **({"model_overrides": (("text_model", args.text_model),)} if args.text_model else {}),
    }


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe (recipe values, then the flags given)."""
    if args.recipe == "sample":
        from ovseg_core.train.config import sample_recipe

        if args.stage != 1:
            raise ValueError("--recipe sample is a stage-1 recipe")
        extra = {k: v for k, v in {"steps": args.steps, "epochs": args.epochs, "base_lr": args.lr,
                                     "seed": args.seed, "device": args.device, "threads": args.threads,
                                     "eval_every": args.eval_every, "resume": not args.no_resume}.items()
                 if v is not None}
        return sample_recipe(args.build, args.out, minutes=args.minutes, **extra)
    common = _common(args)
    if args.dry_run and args.stage == 2 and "init_checkpoint" not in common:
        common["init_checkpoint"] = DRY_RUN_STAGE1  # a plan needs no weights; the real run needs the file
    if args.recipe == "paper":
        from ovseg_core.train.recipe import paper_config

        return paper_config(args.stage, args.build, args.out, world_size=args.gpus * args.nodes,
                            global_batch=args.global_batch, visual_init=args.visual_init, **common)
    if args.steps is None and args.epochs is None:
        raise ValueError("give --steps or --epochs (or --recipe paper / sample)")
    return TrainConfig.for_stage(
        args.stage, build_dir=args.build, out_dir=args.out, batch_size=args.global_batch or 32,
        scale_lr=not args.no_lr_scaling, visual_init=args.visual_init, **common)


def torchrun_command(config_path: Path, devices: int, nodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = TORCHRUN_PORT) -> list[str]:
    """torchrun running this module's `main` on every rank (the one multi-process entry point)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={devices}",
            f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            "-m", "ovseg_core.train.cli", "--config", str(config_path)]


def _launch_torchrun(cfg: TrainConfig, devices: int, nodes: int) -> int:
    config_path = cfg.save_json(Path(cfg.out_dir) / "train_config.json")
    if nodes > 1:
        cmd = " ".join(torchrun_command(config_path, devices, nodes, node_rank=0, master_addr="HOST0"))
        raise ValueError(f"several nodes: run on each node (node_rank 0..{nodes - 1}, HOST0 = node 0): {cmd}")
    return subprocess.call(torchrun_command(config_path, devices), env=os.environ.copy())


def dry_run(cfg: TrainConfig, world_size: int) -> dict[str, object]:
    """The run plan (stdout, exactly the plan's keys); the memory estimate per device goes to stderr."""
    from ovseg_core.models._registry import get_model_config
    from ovseg_core.train.memory import estimate_train_memory_gib
    from ovseg_core.train.recipe import count_train_samples, run_plan

    plan = run_plan(cfg, world_size, count_train_samples(cfg))
    need = estimate_train_memory_gib(get_model_config(cfg.preset, **cfg.model_create_kwargs),
                                     int(plan["per_device_batch"]), cfg.stage, cfg.precision, cfg.max_text_len)
    print(f"cc4m train: about {need:.0f} GiB per device at {plan['per_device_batch']} per device ({cfg.precision}); "
          f"a device with less is refused at start", file=sys.stderr)
    return plan


def cli_train(args: argparse.Namespace) -> int:
    from ovseg_core.models.visual_init import VisualInitUnavailable

    try:
        cfg = train_config_from_args(args)
        world = args.gpus * args.nodes
        if args.dry_run:
            print(json.dumps(dry_run(cfg, world), indent=1))
            return 0
        if world > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_torchrun(cfg, args.gpus, args.nodes)
        return _train_here(cfg)
    except (ValueError, FileNotFoundError, MemoryError, VisualInitUnavailable) as err:
        print(f"cc4m train: {err}", file=sys.stderr)
        return 2


def _train_here(cfg: TrainConfig) -> int:
    from ovseg_core.train import distributed as D
    from ovseg_core.train.loop import train

    result = train(cfg)
    if D.current_info().is_main:
        summary = {k: v for k, v in result.to_dict().items() if k not in ("losses",)}
        summary["final_loss"] = result.losses[-1]["loss"] if result.losses else None
        print(json.dumps(summary, indent=1))
    D.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point: rebuild the saved TrainConfig and train (torchrun's env vars give the rank)."""
    p = argparse.ArgumentParser(description="one training rank (run by torchrun)")
    p.add_argument("--config", required=True, type=Path, help="TrainConfig JSON (TrainConfig.to_dict())")
    args = p.parse_args(argv)
    return _train_here(TrainConfig.from_dict(json.loads(args.config.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    raise SystemExit(main())
