"""`python -m flows.train_entry --config train_config.json`: the per-rank entry point `pretrain` gives torchrun.

It only rebuilds the TrainConfig saved by the flow and calls ovseg_core.train.train (which joins the process group
from torchrun's env vars and writes <out_dir>/result.json on rank 0). No Prefect here: ranks are plain processes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, type=Path, help="TrainConfig JSON (TrainConfig.to_dict())")
    args = p.parse_args(argv)
    from ovseg_core.train import distributed
    from ovseg_core.train.config import TrainConfig
    from ovseg_core.train.loop import train

    train(TrainConfig.from_dict(json.loads(args.config.read_text(encoding="utf-8"))))
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
