"""The paper's ablation at the demo's scale, as a table and as a regression check.

Reads bench_learning.py result JSONs (one per row and seed) and sorts them into rows by their model overrides:
  ITC only           mec_weight=0, entity_prompt_weight=0
  ITC + MEC          entity_prompt_weight=0 (the paper's stage 1)
  + mask (stage 2)   the same run's stage-2 checkpoint (per_checkpoint_scores.stage2), when it has one
  recipe without MEC the sample recipe with mec_weight=0 (the paper's MEC ablation, made where the model learns)
  recipe without colour affinity
                     the sample recipe with colour_affinity_weight=0 (the grouping prior's ablation)
  recipe             the sample recipe (entity-prompt loss on), stage 1, and its stage 2 when present
  recipe + stage 2 without the mask
                     a run with mask_weight=0: its stage 2 is the same steps at the same lr with no mask term (the
                     control that tells the mask's own part from the extra steps'); its stage 1 is not a row
Each cell is a seed's mIoU on the test split and on the fresh render, with the 95% paired-bootstrap interval (test
images resampled) of its lead over the better baseline (untrained same init, all background).

The claims (issue 19 item 3): "ITC + MEC > ITC only" and "+ mask (stage 2) > ITC + MEC", and the same two inside
the sample recipe, where the model learns to segment: "recipe > recipe without MEC", "recipe + stage 2 > recipe",
and "recipe + stage 2 > recipe + stage 2 without the mask" (the gain is the mask's, not the extra steps').
A claim HOLDS when the row beats the other for every seed both have, on the test split and on the fresh render. `--check` exits 1 when a claim that
holds in `--expect` (a JSON list of claim names, e.g. the ones the committed table showed holding) is lost, so a
broken MEC or mask loss shows up as a lost row:

    python benchmarks/ablation_table.py benchmarks/results/ablation-*.json --markdown docs/ablation_table.md
    python benchmarks/ablation_table.py RESULTS... --check --expect '["ITC + MEC > ITC only"]'
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROWS = ("ITC only", "ITC + MEC", "+ mask (stage 2)", "recipe without MEC", "recipe without colour affinity",
        "recipe (+ entity prompts)", "recipe + stage 2", "recipe + stage 2 without the mask")
CLAIMS = {"ITC + MEC > ITC only": ("ITC + MEC", "ITC only"),
          "+ mask (stage 2) > ITC + MEC": ("+ mask (stage 2)", "ITC + MEC"),
          "recipe > recipe without MEC": ("recipe (+ entity prompts)", "recipe without MEC"),
          "recipe > recipe without colour affinity": ("recipe (+ entity prompts)", "recipe without colour affinity"),
          "recipe + stage 2 > recipe": ("recipe + stage 2", "recipe (+ entity prompts)"),
          "recipe + stage 2 > recipe + stage 2 without the mask": ("recipe + stage 2",
                                                                    "recipe + stage 2 without the mask")}
ENTITY_KEYS = ("entity_prompt_weight", "entity_weight")  # the second: results written before the rename


def stage1_row(result: dict[str, Any]) -> str:
    overrides = result.get("model_overrides") or {}
    entity = next((float(overrides[k]) for k in ENTITY_KEYS if k in overrides), 0.0)
    without_mec = float(overrides.get("mec_weight", 1.0)) == 0
    # an explicit 0 only: results from before the term have no such override and were their time's recipe
    without_affinity = float(overrides.get("colour_affinity_weight", 1.0)) == 0
    if entity > 0 and without_affinity:
        return "recipe without colour affinity"
    if entity > 0:
        return "recipe without MEC" if without_mec else "recipe (+ entity prompts)"
    return "ITC only" if without_mec else "ITC + MEC"


def without_mask(result: dict[str, Any]) -> bool:
    return float((result.get("model_overrides") or {}).get("mask_weight", 1.0)) == 0


def seed_of(result: dict[str, Any]) -> int:
    return int(result["stage1"]["config"]["seed"])


def cell(scores: dict[str, Any], split: str) -> dict[str, float] | None:
    """mIoU of one checkpoint on one split, and its interval against the better baseline."""
    if split not in scores:
        return None
    s = scores[split]
    better = max(("untrained_same_init", "untrained_miou"), ("all_background", "background_miou"),
                 key=lambda pair: s[pair[1]])
    iv = s["bootstrap_95"][f"trained_vs_{better[0]}"]
    return {"miou": s["miou"], "lead": iv["delta"], "low": iv["low"], "high": iv["high"]}


def collect(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """{row: {seed: {"test": cell, "fresh": cell}}}; a stage-2 checkpoint becomes the next row of its run."""
    table: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for result in results:
        row, seed = stage1_row(result), seed_of(result)
        per_checkpoint = result["per_checkpoint_scores"]
        if without_mask(result):  # the stage-2 control: only its stage 2 is a row
            if "stage2" in per_checkpoint:
                table[f"{row} + stage 2 without the mask".replace(" (+ entity prompts)", "")][seed] = {
                    split: cell(per_checkpoint["stage2"], split) for split in ("test", "fresh")}
            continue
        table[row][seed] = {split: cell(per_checkpoint["stage1"], split) for split in ("test", "fresh")}
        if "stage2" in per_checkpoint:
            row2 = {"ITC + MEC": "+ mask (stage 2)", "recipe (+ entity prompts)": "recipe + stage 2"}.get(
                row, f"{row} + stage 2")
            table[row2][seed] = {split: cell(per_checkpoint["stage2"], split) for split in ("test", "fresh")}
    return dict(table)


def claim_status(table: dict[str, dict[int, dict[str, Any]]], better: str, worse: str,
                 split: str = "fresh") -> dict[str, Any]:
    """Does `better` beat `worse` on every shared seed and on the mean? (None: a row or a split is missing)."""
    seeds = sorted(set(table.get(better, {})) & set(table.get(worse, {})))
    pairs = [(table[better][s][split], table[worse][s][split]) for s in seeds]
    pairs = [(a["miou"], b["miou"]) for a, b in pairs if a and b]
    if not pairs:
        return {"holds": None, "seeds": 0}
    diffs = [a - b for a, b in pairs]
    return {"holds": all(d > 0 for d in diffs), "seeds": len(diffs), "mean_difference": statistics.mean(diffs),
            "differences": [round(d, 4) for d in diffs], "split": split}


def claim_holds(table: dict[str, dict[int, dict[str, Any]]], name: str) -> bool | None:
    """A claim holds on the test split AND on the fresh render (None: not measured)."""
    status = [claim_status(table, *CLAIMS[name], split=split)["holds"] for split in ("test", "fresh")]
    return None if None in status else all(status)


def row_learns(table: dict[str, dict[int, dict[str, Any]]], row: str) -> bool | None:
    """Every seed of `row` beats the better baseline: the 95% interval of its lead is above 0 on both splits."""
    cells = [c for seed in table.get(row, {}).values() for c in (seed.get("test"), seed.get("fresh"))]
    if not cells or None in cells:
        return None
    return all(c["low"] > 0 for c in cells)


def check(table: dict[str, dict[int, dict[str, Any]]], expected: list[str]) -> list[str]:
    """The expected claims that do not hold (lost rows); empty when all hold. A claim is a name of CLAIMS, or
    "<row> learns" (`row_learns`), which still guards a row when no comparison between rows holds."""
    learns = {f"{row} learns": row for row in ROWS}
    unknown = sorted(set(expected) - set(CLAIMS) - set(learns))
    if unknown:
        raise ValueError(f"unknown claims {unknown}; known: {sorted(CLAIMS) + sorted(learns)}")
    return [name for name in expected
            if not (row_learns(table, learns[name]) if name in learns else claim_holds(table, name))]


def _fmt(c: dict[str, float] | None) -> str:
    if not c:
        return "-"
    return f"{c['miou']:.3f} ({c['lead']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}])"


def markdown(table: dict[str, dict[int, dict[str, Any]]]) -> str:
    seeds = sorted({s for row in table.values() for s in row})
    head = "| row | " + " | ".join(f"seed {s} test | seed {s} fresh" for s in seeds) + " | mean fresh |"
    lines = [head, "|" + "---|" * (2 + 2 * len(seeds))]
    for row in [r for r in ROWS if r in table] + sorted(set(table) - set(ROWS)):
        cells = [(_fmt(table[row].get(s, {}).get("test")), _fmt(table[row].get(s, {}).get("fresh"))) for s in seeds]
        fresh = [table[row][s]["fresh"]["miou"] for s in table[row] if table[row][s].get("fresh")]
        mean = f"{statistics.mean(fresh):.3f}" if fresh else "-"
        lines.append(f"| {row} | " + " | ".join(f"{a} | {b}" for a, b in cells) + f" | {mean} |")
    lines += ["", "mIoU (lead over the better baseline, 95% paired-bootstrap interval over images).", ""]
    for name, (better, worse) in CLAIMS.items():
        verdict = {True: "holds", False: "does NOT hold", None: "not measured"}[claim_holds(table, name)]
        details = []
        for split in ("test", "fresh"):
            status = claim_status(table, better, worse, split=split)
            if status["seeds"]:
                details.append(f"{split} differences per seed {status['differences']} (mean "
                               f"{status['mean_difference']:+.3f})")
        lines.append(f"- **{name}** {verdict} (on both the test split and the fresh render, every seed): "
                     + "; ".join(details))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="bench_learning.py result JSONs")
    p.add_argument("--markdown", type=Path, help="write the table here (else print it)")
    p.add_argument("--check", action="store_true", help="exit 1 when an --expect claim does not hold")
    p.add_argument("--expect", default=json.dumps(sorted(CLAIMS)), help="JSON list of claims the check requires")
    args = p.parse_args(argv)
    table = collect([json.loads(path.read_text(encoding="utf-8")) for path in args.results])
    text = markdown(table)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    else:
        print(text)
    if args.check:
        lost = check(table, json.loads(args.expect))
        if lost:
            print(f"ablation check: lost rows: {lost}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
