"""Flow `evaluate`: zero-shot segmentation mIoU of a checkpoint on one or more datasets (by layout), with per-class
IoU tables and colour overlays written as files and published as Prefect artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from manifests.registry import ModelRegistry


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "dataset"


@task(name="evaluate-dataset", cache_policy=None)
def evaluate_dataset(checkpoint: str, layout: str, root: str, split: str, out_dir: str,
                     max_images: int | None, overlays: int, select_split: str | None = None,
                     candidates: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """ovseg_core.evaluation.evaluate with the paper's protocol sizes relative to the model's training resolution
    (as `cc4m eval` does); it writes metrics.json, per_class_iou.csv and overlays/ into out_dir. With
    `select_split`, the evaluator settings (bg_thresh, topk, assignment, test size) are first chosen on that split
    of the same folder (never the evaluated one), as the learning benchmark does, among `candidates` (overrides of
    DEFAULT_CANDIDATES)."""
    from ovseg_core.evaluation import evaluate, load_dataset
    from ovseg_core.evaluation.evaluate import protocol_sizes
    from ovseg_core.models.checkpoint import load_model_from_checkpoint

    model = load_model_from_checkpoint(checkpoint)
    settings: dict[str, Any] = protocol_sizes(int(model.image_size))
    if select_split:
        from ovseg_core.evaluation.selection import select_eval_settings

        if select_split == split:
            raise ValueError(f"select_split must differ from the evaluated split ({split!r})")
        chosen = select_eval_settings(model, load_dataset(layout, root, select_split), candidates)
        settings = dict(chosen["chosen"])
        get_run_logger().info("settings chosen on %s: %s (selection mIoU %.4f)", select_split, settings,
                              chosen["selection_mIoU"])
    return evaluate(model, load_dataset(layout, root, split), max_images=max_images, out_dir=out_dir,
                    n_overlays=overlays, **settings)


def per_class_rows(per_class: dict[str, float | None]) -> list[dict[str, Any]]:
    """Table-artifact rows; classes absent from both ground truth and prediction have IoU None (not in the mean)."""
    return [{"class": name, "IoU": None if iou is None else round(float(iou), 4)} for name, iou in per_class.items()]


@flow(name="evaluate", persist_result=True)
def evaluate(checkpoint: str, datasets: list[dict[str, Any]], out_dir: str | None = None, split: str = "val",
             max_images: int | None = None, overlays: int = 8, registry_dir: str | None = None,
             entry_id: str | None = None, metric_prefix: str = "eval") -> dict[str, Any]:
    """Evaluate `checkpoint` on each {"layout", "root"[, "split", "name", "select_split", "candidates"]} of `datasets`.

    Writes <out_dir>/<name>/per_class_iou.csv, metrics.json and overlay PNGs; publishes a table artifact per dataset
    and one Markdown artifact; with `registry_dir` + `entry_id` records "<metric_prefix>_mIoU" on that entry.
    """
    from ovseg_core.evaluation.overlay import contact_sheet  # lazily, like the rest of ovseg_core (torch is heavy)

    logger = get_run_logger()
    out_path = Path(out_dir).resolve() if out_dir else Path(checkpoint).resolve().parent / "eval"
    results: dict[str, Any] = {}
    lines = [f"# Evaluation of `{checkpoint}`", "", "| dataset | split | mIoU | images |", "|---|---|---|---|"]
    overlay_lines: list[str] = []
    for spec in datasets:
        name = spec.get("name") or _slug(f"{spec['layout']}-{Path(spec['root']).name}")
        ds_split = spec.get("split", split)
        ds_dir = out_path / name
        metrics = evaluate_dataset(checkpoint, spec["layout"], str(Path(spec["root"]).resolve()), ds_split,
                                   str(ds_dir), max_images, overlays, spec.get("select_split"),
                                   spec.get("candidates"))
        miou = metrics["mIoU"] if metrics["mIoU"] is not None else float("nan")  # None: nothing could be scored
        create_table_artifact(table=per_class_rows(metrics["per_class"]), key=f"evaluate-{_slug(name)}"[:60],
                              description=f"Per-class IoU on {name} ({ds_split}): mIoU {miou:.4f}")
        sheet = str(contact_sheet(metrics["overlays"], ds_dir / "contact_sheet.png")) if metrics["overlays"] else None
        results[name] = {"mIoU": metrics["mIoU"], "split": ds_split, "n_images": metrics["n_images"],
                         "per_class_csv": metrics["outputs"].get("per_class_iou"), "per_class": metrics["per_class"],
                         "metrics_json": metrics["outputs"].get("metrics"), "overlays": metrics["overlays"],
                         "contact_sheet": sheet}
        lines.append(f"| {name} | {ds_split} | {miou:.4f} | {metrics['n_images']} |")
        overlay_lines += [f"- {name}: contact sheet (first 16 overlays, 4 x 4) `{sheet}`"] if sheet else []
        overlay_lines += [f"- {name}: `{p}`" for p in metrics["overlays"]]
        logger.info("%s (%s): mIoU %.4f over %d images", name, ds_split, miou, metrics["n_images"])
    markdown = "\n".join(lines + ["", "## Overlays (files)", *overlay_lines]) + "\n"
    (out_path / "evaluation.md").parent.mkdir(parents=True, exist_ok=True)
    (out_path / "evaluation.md").write_text(markdown, encoding="utf-8")
    create_markdown_artifact(markdown=markdown, key="evaluate-summary", description=f"evaluation of {checkpoint}")
    scored = [r["mIoU"] for r in results.values() if r["mIoU"] is not None]
    summary = {"checkpoint": checkpoint, "out_dir": str(out_path), "datasets": results,
               "mIoU": sum(scored) / len(scored) if scored else None}  # mean over datasets
    if registry_dir and entry_id and summary["mIoU"] is not None:
        ModelRegistry(registry_dir).update_metrics(entry_id, {f"{metric_prefix}_mIoU": summary["mIoU"]})
    return summary
