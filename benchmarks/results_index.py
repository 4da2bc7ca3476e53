"""The results index: which file is current for each benchmark, and the check that every result is traceable.

    .venv/bin/python benchmarks/results_index.py            # archive superseded runs, rewrite results/README.md
    .venv/bin/python benchmarks/results_index.py --check    # exit 1 if a result breaks the naming or stamp rules

One naming scheme: `<group>-<YYYYmmddTHHMMSSZ>.json` (a `.png` of the same stem belongs to it). The group is the
benchmark plus its variant (`learning-seed0`, `gpu-b256`). The newest file of a group is current; older ones move to
`archive/`. Every JSON records `code_version` and `created_at`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = re.compile(r"^(?P<group>[a-z0-9_]+(?:-[a-z0-9_]+)*)-(?P<ts>\d{8}T\d{6}Z)$")
REQUIRED = ("code_version", "created_at")


@dataclass(frozen=True)
class Result:
    path: Path
    group: str
    stamp: str
    body: dict[str, Any]


def problems_of(path: Path) -> list[str]:
    """Why `path` breaks the rules (empty when it is fine)."""
    if not NAME.match(path.stem):
        return [f"{path.name}: name is not <group>-<YYYYmmddTHHMMSSZ>.json"]
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path.name}: unreadable JSON ({exc})"]
    return [f"{path.name}: no {key}" for key in REQUIRED if not body.get(key)]


def load(folder: Path) -> list[Result]:
    """Every result JSON in `folder` (not its archive), parsed; raises on the first rule broken."""
    results = []
    for path in sorted(folder.glob("*.json")):
        found = problems_of(path)
        if found:
            raise ValueError("; ".join(found))
        match = NAME.match(path.stem)
        results.append(Result(path, match["group"], match["ts"], json.loads(path.read_text(encoding="utf-8"))))
    return results


def current_and_superseded(results: list[Result]) -> tuple[dict[str, Result], list[Result]]:
    """The newest result per group, and all the others."""
    current: dict[str, Result] = {}
    for result in sorted(results, key=lambda r: r.stamp):
        current[result.group] = result
    kept = {id(r) for r in current.values()}
    return current, [r for r in results if id(r) not in kept]


def archive(superseded: list[Result], folder: Path) -> None:
    """Move superseded runs (and their pictures) into `folder/archive/`; never overwrite an archived one."""
    target = folder / "archive"
    target.mkdir(exist_ok=True)
    for result in superseded:
        for path in (result.path, result.path.with_suffix(".png")):
            if not path.exists():
                continue
            dest = target / path.name
            if dest.exists():
                raise FileExistsError(f"{dest} already archived; refusing to overwrite it")
            path.rename(dest)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"
    return str(value)


def _get(body: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        body = body.get(key, {}) if isinstance(body, dict) else {}
    return body if body != {} else None


def _learning(body: dict[str, Any]) -> str:
    text = f"mIoU {_fmt(_get(body, 'miou', 'trained'))} (test)"
    fresh = _get(body, "fresh_eval", "miou", "trained")
    return text + (f", {_fmt(fresh)} (fresh render)" if fresh is not None else "")


def _gpu(body: dict[str, Any]) -> str:
    parts = []
    for name, preset in (body.get("presets") or {}).items():
        rate = preset.get("images_per_s") or preset.get("img_per_s")
        mfu = preset.get("mfu")
        parts.append(f"{name} {_fmt(rate)} img/s" + (f", MFU {_fmt(mfu, 2)}" if mfu is not None else ""))
    return "; ".join(parts) or "see file"


def _gpu_profile(body: dict[str, Any]) -> str:
    parts = []
    for name, preset in (body.get("presets") or {}).items():
        steps = preset.get("by_batch", {})
        times = "/".join(f"{1000 * steps[b]['step_s']:.0f}" for b in steps)
        parts.append(f"{name} step {times} ms at batch {'/'.join(steps)}")
    return "; ".join(parts) or "see file"


def _loader(body: dict[str, Any]) -> str:
    ratio = _get(body, "throughput", "paired_ratios", "buffer_vs_baseline_disk_per_cpu_s", "median_ratio")
    return f"stream / plain decode, samples per CPU-s: {_fmt(ratio)}" if ratio is not None else "see file"


def _loader_costs(body: dict[str, Any]) -> str:
    ratios = _get(body, "costs", "tiny", "paired_ratios") or {}
    parts = [f"{label} {_fmt(_get(ratios, key, 'median_ratio'))}x" for label, key in
             (("stage 1", "ours1_vs_plain"), ("stage 2", "ours2_vs_plain"), ("GPU decode", "ours1_gpu_vs_plain"))]
    return "CPU-s/sample vs plain decode-and-crop: " + ", ".join(parts) if ratios else "see file"


def _step(body: dict[str, Any]) -> str:
    rows = body.get("rows") or []
    eager = next((r["kernels"] for r in rows if r["compile"] == "off"), None)
    compiled = next((r["kernels"] for r in rows if r["compile"] == "on"), None)
    return f"{body.get('preset')} kernels/step eager {eager}, compiled {compiled}" if eager else "see file"


def _scale(body: dict[str, Any]) -> str:
    parts = []
    for side in ("before_download", "after_download"):
        stages = (body.get(side) or {}).get("stages") or {}
        if stages:
            worst = max(stages, key=lambda name: stages[name].get("time_exponent") or 0)
            rss = max(stage.get("extrapolated_peak_rss_gb") or 0 for stage in stages.values())
            parts.append(f"{side.replace('_', ' ')}: largest time exponent {stages[worst].get('time_exponent')} "
                         f"({worst}), peak RSS at {body[side].get('target_rows'):,} rows {rss} GB")
    return "; ".join(parts) or "see file"


def _mixing(body: dict[str, Any]) -> str:
    runs = body.get("mixing") or {}
    ideal = _get(runs, "ideal uniform batches", "class_tvd")
    ours = [v["class_tvd"] for k, v in runs.items() if k.startswith("reshard layout, one growth round")]
    if ideal is None or not ours:
        return "see file"
    return f"class-mix distance {ours[0]:.3f} vs uniform ideal {ideal:.3f} ({ours[0] / ideal:.2f}x)"


HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "scale": _scale,
    "loader_mixing": _mixing,
    "loader_costs": _loader_costs,
    "step": _step,
    "learning": _learning,
    "loader": _loader,
    "gpu_profile": _gpu_profile,
    "ablation": _learning,
    "gpu": _gpu,
    "build": lambda b: f"build / raw img2dataset {_fmt(_get(b, 'ratio_build_vs_raw', 'median') or b.get('ratio'))}",
    "download": lambda b: f"peak tree RSS {b.get('peak_tree_rss_mib')} MiB",
    "faults": lambda b: f"{b.get('identical')}/{b.get('trials')} killed builds identical after rerun",
    "index": lambda b: f"{b.get('build_seconds')} s, {b.get('max_rss_gib')} GiB peak at 4M samples",
    "gpu_flops": lambda b: f"train GFLOPs per image {b.get('train_gflops_per_image')}",
    "parse": lambda b: f"{_fmt(b.get('speedup'))}x captions per CPU-s vs naive spaCy, agreement {b.get('agreement')}",
    "rerun": lambda b: f"rerun / fresh build {_fmt(_get(b, 'ratio_rerun_same_folder', 'median'))}",
    "selection_sweep": lambda b: (f"sweep seconds, {b.get('baseline_revision')} / this code "
                                  f"{_fmt(_get(b, 'sweep_ratio_baseline_over_this', 'median_ratio'))}x, "
                                  f"scores identical: {b.get('scores_identical')}"),
}


def headline(result: Result) -> str:
    """A benchmark's own `headline`, else the registered one for its family, else a pointer to the file."""
    if isinstance(result.body.get("headline"), str):
        return result.body["headline"]
    family = result.group.split("-")[0]
    family = {"gpu-profile": "gpu_profile", "gpu-flops": "gpu_flops", "loader-mixing": "loader_mixing"}.get(
        result.group, family)
    try:
        return HEADLINES[family](result.body) if family in HEADLINES else "see file"
    except (AttributeError, TypeError, KeyError):
        return "see file"


def render(current: dict[str, Result]) -> str:
    """The index page: one row per benchmark group."""
    lines = [
        "# Benchmark results", "",
        "Written by `benchmarks/results_index.py`; do not edit by hand. One row per benchmark (and variant): its current",
        "file, the code it ran on, when, and its headline figure. Superseded runs are in `archive/`. Naming:",
        "`<benchmark>[-<variant>]-<UTC time>.json`; a plain rerun writes a new file, never over a kept one.", "",
        "| benchmark | current file | code version | created | headline |", "|---|---|---|---|---|",
    ]
    for group in sorted(current):
        r = current[group]
        lines.append(f"| {group} | [{r.path.name}]({r.path.name}) | `{r.body['code_version']}` | "
                     f"{r.body['created_at']} | {headline(r).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="only check names and stamps, results and archive")
    args = parser.parse_args(argv)
    if args.check:
        found = [p for path in sorted(args.folder.glob("*.json")) + sorted(args.folder.glob("archive/*.json"))
                 for p in problems_of(path)]
        print("\n".join(found) or "ok")
        return 1 if found else 0
    current, superseded = current_and_superseded(load(args.folder))
    archive(superseded, args.folder)
    (args.folder / "README.md").write_text(render(current), encoding="utf-8")
    print(f"{len(current)} current, {len(superseded)} archived -> {args.folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
