"""Flow `build-cc4m`: runs the stage plan (curation.stages) as Prefect tasks, one named after each stage; all logic
lives in `curation`.

    ingest -> [parse -> select] per part (fan-out, selectable task runner) -> download -> verify -> dedup -> index
           -> reshard -> manifest -> report (+ Markdown and table artifacts)

Resume: every stage is idempotent on files and content-addressed (no Prefect result cache, see flows/tasks.py), so
rerunning the flow on the same build_dir after a failure redoes only the missing work.

Hand-over to training: `then_train=True` runs the `pretrain` and `evaluate` flows as SUBFLOWS of this run. Chosen
over `run_deployment` / an automation because it needs nothing but this process (works under the test harness,
`python -m flows.build` and any work pool alike) and the whole lineage sits in one flow-run tree. With a server,
the alternative is an automation on `prefect.flow-run.Completed` of build-cc4m (example in flows/prefect.yaml).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from curation.config import config_with_overrides
from curation.lock import BuildLock
from curation.sample.server import serving_sample
from curation.source import open_source
from curation.stages import STAGE_PLAN, ingest_parts
from flows.tasks import fetch_source, prepare_task, report_markdown_task, stage_task

TaskRunnerKind = Literal["threads", "dask"]

def sum_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up per-part count dicts: numbers are summed, nested dicts of numbers merged, other values dropped."""
    total: dict[str, Any] = {"parts": len(results)}
    for result in results:
        for key, value in result.items():
            if isinstance(value, bool):
                total[key] = total.get(key, 0) + int(value)
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):
                total[key] = sum_counts([total.get(key, {}), value]) if key in total else dict(value)
                total[key].pop("parts", None)
    return total


def make_task_runner(kind: TaskRunnerKind = "threads", dask_address: str | None = None, dask_workers: int = 2,
                     max_threads: int | None = None) -> TaskRunner:
    """ThreadPoolTaskRunner, or a DaskTaskRunner on `dask_address` (None: a temporary LocalCluster of processes)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_threads)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner  # optional heavy import only when asked for

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise ValueError(f"task_runner must be 'threads' or 'dask', got {kind!r}")


def _log_counts(stage: str, counts: dict[str, Any]) -> None:
    scalars = {k: v for k, v in counts.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    get_run_logger().info("%s: %s", stage, json.dumps(scalars, sort_keys=True, default=str))


@flow(name="per-part-stages")
def per_part_stages(parts: list[str], stages: list[str], build_config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Fan-out: one task per (part, stage), each part's stages in plan order; every future is resolved, so any
    failure fails this subflow and hence the build."""
    futures: dict[str, list[Any]] = {}
    before: list[Any] = [None] * len(parts)
    for stage in stages:
        run = stage_task.with_options(name=stage)
        futures[stage] = before = [run.submit(stage, build_config, part, wait_for=[b] if b is not None else None)
                                   for part, b in zip(parts, before)]
    return {stage: [f.result() for f in fs] for stage, fs in futures.items()}


@task(name="make-sample", cache_policy=None)
def make_sample_task(sample_dir: str, n_rows: int | None) -> dict[str, str]:
    from curation.sample import make_sample

    info = make_sample(Path(sample_dir), **({} if n_rows is None else {"n_rows": n_rows}))
    return {"source_tsv": str(info.source_tsv), "eval_dir": str(info.eval_dir), "root": str(Path(sample_dir))}


def default_sample_dir(build_dir: str | Path) -> Path:
    return Path(build_dir).resolve().parent / "sample"


@flow(name="build-cc4m", persist_result=True)
def build_cc4m(source: str | None = None, build_dir: str = ".cc4m-runs/sample/cc4m",
               config: dict[str, Any] | None = None, sample: bool = False, sample_dir: str | None = None,
               sample_rows: int | None = None, task_runner: TaskRunnerKind = "threads",
               dask_address: str | None = None, dask_workers: int = 2, then_train: bool = False,
               train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build CC4M into `build_dir` from `source`, or from the embedded sample. `source`: a TSV/parquet path or
    http(s) URL, or webdataset shards (a folder of .tar, a glob or a brace pattern, local or http(s)) whose images
    are extracted instead of downloaded.

    Args:
        config: overrides of BuildConfig.to_dict() (nested per stage) or shortcuts: samples_per_shard, processes,
            threads, image_size, distributor (img2dataset's), rows_per_part.
        sample: make the embedded sample in `sample_dir` (default: <build_dir>/../sample), download its images from
            its local server (http proxy on 127.0.0.1) and stop it after.
        task_runner: "threads" (default) or "dask": the parse/select fan-out and the download's parts (whole staging
            shards, each a guarded img2dataset run; curation.download_parts) run on Dask workers; `dask_address` =
            an existing scheduler (the build folder on a file system its workers share), None = temporary
            LocalClusters with `dask_workers` single-thread worker processes.
        then_train: then run the `pretrain` and `evaluate` flows as subflows; `train` = their extra parameters.
    """
    logger = get_run_logger()
    build_path = str(Path(build_dir).resolve())
    sample_info: dict[str, str] | None = None
    if sample:
        sample_root = Path(sample_dir).resolve() if sample_dir else default_sample_dir(build_path)
        sample_info = make_sample_task(str(sample_root), sample_rows)
        source = source or sample_info["source_tsv"]
    if not source:
        raise ValueError("build-cc4m needs a source (TSV/parquet path or URL, or webdataset shards) or sample=True")
    # One build at a time per folder, held for the whole flow run (curation.lock): a second run fails at once.
    with BuildLock(build_path):
        source_path = fetch_source(source, build_path)
        open_source(source_path).check()  # a mistyped source fails here, before config.json is written
        cfg = config_with_overrides(source_path, build_path, overrides=config)
        with serving_sample(sample_info["root"] if sample_info else None, cfg.download.timeout) as proxy_url:
            if proxy_url:
                cfg = replace(cfg, download=replace(cfg.download, http_proxy=proxy_url))
            prepare_task(cfg.to_dict())
            logger.info("building %s from %s (task runner %s)", build_path, source_path, task_runner)
            dask = {"address": dask_address, "workers": dask_workers} if task_runner == "dask" else None
            results = run_plan(cfg.to_dict(), make_task_runner(task_runner, dask_address, dask_workers), dask)
        markdown = report_markdown_task(build_path)
        manifest_path, report_path = results["manifest"]["path"], results["report"]["path"]
        logger.info("manifest %s, report %s", manifest_path, report_path)
        create_markdown_artifact(markdown=markdown, key="build-cc4m-report",
                                 description=f"CC4M build report for {build_path}")
        create_table_artifact(table=counts_table(results), key="build-cc4m-counts",
                              description=f"Per-stage counts of {build_path}")

    summary: dict[str, Any] = {"build_dir": build_path, "manifest": manifest_path, "report": report_path,
                               "counts": results, "sample": sample_info}
    if then_train:
        summary["train"] = _train_and_evaluate(build_path, sample_info, train or {})
    return summary


def run_plan(build_config: dict[str, Any], fan_out_runner: TaskRunner,
             dask: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every stage of the plan (curation.stages) as a task named after it; consecutive per-part stages run as one
    fan-out subflow on `fan_out_runner`; with `dask`, the download's parts run on Dask workers (stage_task).
    Returns each stage's result (per-part stages: a list per part)."""
    results: dict[str, Any] = {}
    for per_part, group in groupby(STAGE_PLAN, key=lambda stage: stage.per_part):
        names = [stage.name for stage in group]
        if per_part:
            fan_out = per_part_stages.with_options(task_runner=fan_out_runner)
            results.update(fan_out(ingest_parts(results), names, build_config))
        else:
            for name in names:
                results[name] = stage_task.with_options(name=name)(name, build_config, results=dict(results),
                                                                   dask=dask if name == "download" else None)
        for name in names:
            _log_counts(name, sum_counts(results[name]) if per_part else results[name])
    return results


def counts_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (stage, count) with a scalar numeric value: the table artifact."""
    rows = []
    for stage, counts in results.items():
        total = sum_counts(counts) if isinstance(counts, list) else counts
        rows += [{"stage": stage, "count": key, "value": value} for key, value in total.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return rows


EVALUATE_KEYS = ("datasets", "max_images", "overlays")


def _train_and_evaluate(build_dir: str, sample_info: dict[str, str] | None, train: dict[str, Any]) -> dict[str, Any]:
    """then_train: `train` holds pretrain's parameters plus evaluate's `datasets`, `max_images`, `overlays`."""
    from flows.evaluate import evaluate
    from flows.pretrain import pretrain
    from manifests.registry import default_registry_dir

    trained = pretrain(build_dir=build_dir, **{k: v for k, v in train.items() if k not in EVALUATE_KEYS})
    datasets = train.get("datasets") or ([{"layout": "sample", "root": sample_info["eval_dir"], "split": "val"}]
                                         if sample_info else [])
    if not datasets:
        get_run_logger().warning("then_train: no evaluation datasets given (train.datasets); skipping evaluate")
        return {"pretrain": trained}
    evaluated = evaluate(checkpoint=trained["checkpoint"], datasets=datasets,
                         out_dir=str(Path(trained["out_dir"]) / "eval"), entry_id=trained["entry_id"],
                         registry_dir=str(train.get("registry_dir") or default_registry_dir()),
                         **{k: train[k] for k in ("max_images", "overlays") if k in train})
    return {"pretrain": trained, "evaluate": evaluated}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.build --sample` runs the flow in-process (ephemeral API unless PREFECT_API_URL is set)."""
    p = argparse.ArgumentParser(description=build_cc4m.__doc__)
    p.add_argument("--source")
    p.add_argument("--build-dir", default=".cc4m-runs/sample/cc4m")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--config", type=json.loads, default=None, help='JSON overrides, e.g. {"samples_per_shard": 100}')
    p.add_argument("--task-runner", choices=["threads", "dask"], default="threads")
    p.add_argument("--dask-address")
    args = p.parse_args(argv)
    summary = build_cc4m(source=args.source, build_dir=args.build_dir, config=args.config, sample=args.sample,
                         task_runner=args.task_runner, dask_address=args.dask_address)
    print(json.dumps({k: summary[k] for k in ("build_dir", "manifest", "report")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
