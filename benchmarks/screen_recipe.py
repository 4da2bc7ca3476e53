"""Screen one change of the sample recipe on the SELECTION split: train, choose evaluator settings, diagnose.

The quick loop behind the recipe's choices for issue 19 (docs/demo.md, "Screening"): train `tiny` with the sample
recipe plus the given changes for the demo's wall-clock budget, choose the zero-shot settings on the selection split
(`ImageSets/Segmentation/train.txt`), and run `segmentation_diagnosis` there (grouping oracle, share of objects whose
group gets the right class). It never reads the test split or a fresh render: those are for bench_learning.py, once
the recipe is chosen. One line of JSON per run is appended to --out.

    python benchmarks/screen_recipe.py NAME --build DIR --eval-root DIR --step-seconds 0.5 \
        --changes '{"augment": "none", "model_overrides": {"unclaimed_group_weight": 1.0}}'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_learning.py

import torch

from benchmarks.common import stamp
from benchmarks.segmentation_diagnosis import diagnose


def screen(name: str, build: str, eval_root: str, work: Path, step_seconds: float, budget_s: float,
           changes: dict) -> dict:
    from ovseg_core.evaluation.datasets import load_dataset
    from ovseg_core.evaluation.selection import select_eval_settings
    from ovseg_core.models.checkpoint import load_model_from_checkpoint
    from ovseg_core.train.config import TrainConfig, sample_recipe
    from ovseg_core.train.loop import train

    changes = dict(changes)
    model_changes = dict(changes.pop("model_overrides", {}))
    steps = max(10, int(budget_s / step_seconds))
    recipe = sample_recipe(build, work / name, steps=steps, warmup_steps=max(1, steps // 15),
                           time_limit_s=budget_s + 20, resume=False, **changes)
    overrides = {**dict(recipe.model_overrides), **model_changes}
    cfg = TrainConfig.from_dict({**recipe.to_dict(), "model_overrides": [list(kv) for kv in overrides.items()]})
    started = time.time()
    run = train(cfg)
    model = load_model_from_checkpoint(run.last_checkpoint).eval()
    selection = load_dataset("sample", eval_root, split="train")
    chosen = select_eval_settings(model, selection)
    size = int(model.image_size)
    return {"name": name, "changes": {**changes, "model_overrides": model_changes}, "steps": run.final_step,
            "train_seconds": round(time.time() - started, 1), "mean_step_s": run.mean_step_s,
            "selection_miou": chosen["selection_mIoU"], "chosen": chosen["chosen_candidate"],
            "diagnosis": [diagnose(model, selection, s, 40) for s in (size, 2 * size)], "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--build", required=True)
    p.add_argument("--eval-root", required=True)
    p.add_argument("--changes", default="{}", help="JSON: TrainConfig fields and model_overrides to change")
    p.add_argument("--step-seconds", type=float, default=0.5, help="plans the cosine for the budget")
    p.add_argument("--budget-seconds", type=float, default=240.0, help="the demo's training budget")
    p.add_argument("--work-dir", default="screen_runs")
    p.add_argument("--out", type=Path, default=Path("screen_recipe.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    row = screen(args.name, args.build, args.eval_root, Path(args.work_dir), args.step_seconds,
                 args.budget_seconds, json.loads(args.changes))
    row.update(stamp())
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
