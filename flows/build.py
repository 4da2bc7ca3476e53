"""Flow `build-cc4m`: orders the curation stages as Prefect tasks; all logic lives in `curation`.

    ingest -> [parse -> select] per part (fan-out, selectable task runner) -> download -> verify -> dedup -> index
           -> reshard -> manifest -> report (+ Markdown and table artifacts)

Resume: every stage is idempotent on files, and the tasks' cache keys include their outputs (see flows/tasks.py),
so rerunning the flow on the same build_dir after a failure redoes only the missing work.

Hand-over to training: `then_train=True` runs the `pretrain` and `evaluate` flows as SUBFLOWS of this run. Chosen
over `run_deployment` / an automation because it needs nothing but this process (works under the test harness,
`python -m flows.build` and any work pool alike) and the whole lineage sits in one flow-run tree. With a server,
the alternative is an automation on `prefect.flow-run.Completed` of build-cc4m (example in flows/prefect.yaml).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from curation.build import check_source
from curation.config import BuildConfig
from curation.lock import BuildLock
from flows.tasks import (
    dedup_task,
    download_task,
    fetch_source,
    index_task,
    ingest_task,
    manifest_task,
    parse_task,
    prepare_task,
    report_task,
    reshard_task,
    select_task,
    verify_task,
)

TaskRunnerKind = Literal["threads", "dask"]

# Flat convenience overrides (what people type) -> their place in BuildConfig.to_dict().
OVERRIDE_SHORTCUTS: dict[str, tuple[str, str]] = {
    "samples_per_shard": ("shard", "samples_per_shard"),
    "processes": ("download", "processes_count"),
    "threads": ("download", "thread_count"),
    "image_size": ("download", "image_size"),
    "distributor": ("download", "distributor"),
    "rows_per_part": ("ingest", "rows_per_part"),
}


def merge_config(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Deep-merge `overrides` (nested like BuildConfig.to_dict(), or OVERRIDE_SHORTCUTS keys) into `base`."""
    merged = json.loads(json.dumps(base, default=list))
    for key, value in (overrides or {}).items():
        if key in OVERRIDE_SHORTCUTS:
            section, field_name = OVERRIDE_SHORTCUTS[key]
            merged.setdefault(section, {})[field_name] = value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        elif key in merged:
            merged[key] = value
        else:
            raise ValueError(f"unknown build config key {key!r}; known: {sorted(merged)} + "
                             f"{sorted(OVERRIDE_SHORTCUTS)}")
    return merged


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


@flow(name="parse-select")
def parse_select(build_dir: str, parts: list[str], parse_cfg: dict[str, Any],
                 select_cfg: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Fan-out: one parse task then one select task per ingest part; every future is resolved, so any failure
    fails this subflow and hence the build."""
    parsed = [parse_task.submit(build_dir, part, parse_cfg) for part in parts]
    selected = [select_task.submit(build_dir, part, select_cfg, wait_for=[p]) for part, p in zip(parts, parsed)]
    return {"parse": [f.result() for f in parsed], "select": [f.result() for f in selected]}


@task(name="make-sample", cache_policy=None)
def make_sample_task(sample_dir: str, n_rows: int | None) -> dict[str, str]:
    from curation.sample import make_sample

    info = make_sample(Path(sample_dir), **({} if n_rows is None else {"n_rows": n_rows}))
    return {"source_tsv": str(info.source_tsv), "eval_dir": str(info.eval_dir), "root": str(Path(sample_dir))}


@contextmanager
def _sample_server(root: str | None, download_timeout_s: float) -> Iterator[str | None]:
    """The embedded sample's image server (its http proxy URL) while the block runs; None when not a sample.
    Its deliberately slow URLs answer just after the download timeout, so they fail as intended."""
    if root is None:
        yield None
        return
    from curation.sample import SampleImageServer

    server = SampleImageServer(Path(root), slow_seconds=download_timeout_s + 1)
    try:
        yield server.start()
    finally:
        server.stop()


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
        check_source(source_path)  # a mistyped source fails here, before config.json is written
        cfg = BuildConfig.from_dict(merge_config(BuildConfig(source=source_path, build_dir=build_path).to_dict(), config))
        cfg_dict = cfg.to_dict()
        prepare_task(cfg_dict)
        logger.info("building %s from %s (task runner %s)", build_path, source_path, task_runner)

        results: dict[str, Any] = {"ingest": ingest_task(source_path, build_path, cfg_dict["ingest"],
                                                         processes=cfg_dict["download"]["processes_count"])}
        _log_counts("ingest", results["ingest"])

        fan_out = parse_select.with_options(task_runner=make_task_runner(task_runner, dask_address, dask_workers))
        per_part = fan_out(build_path, results["ingest"]["parts"], cfg_dict["parse"], cfg_dict["select"])
        for stage in ("parse", "select"):
            results[stage] = per_part[stage]  # per-part lists: the manifest adds them up and reads parse's versions
            _log_counts(stage, sum_counts(per_part[stage]))

        download_cfg = dict(cfg_dict["download"])
        with _sample_server(sample_info["root"] if sample_info else None, download_cfg["timeout"]) as proxy_url:
            dask = {"address": dask_address, "workers": dask_workers} if task_runner == "dask" else None
            results["download"] = download_task(build_path, download_cfg, http_proxy=proxy_url, source=source_path,
                                                dask=dask)
        _log_counts("download", results["download"])
        for stage, config_key, run in (("verify", "verify", verify_task), ("dedup", "dedup", dedup_task),
                                       ("index", "index", index_task), ("reshard", "shard", reshard_task)):
            results[stage] = run(build_path, cfg_dict[config_key])
            _log_counts(stage, results[stage])

        manifest_path = manifest_task(build_path, cfg_dict, results)
        report = report_task(build_path)
        logger.info("manifest %s, report %s", manifest_path, report["path"])
        create_markdown_artifact(markdown=report["markdown"], key="build-cc4m-report",
                                 description=f"CC4M build report for {build_path}")
        create_table_artifact(table=counts_table(results), key="build-cc4m-counts",
                              description=f"Per-stage counts of {build_path}")

    summary: dict[str, Any] = {"build_dir": build_path, "manifest": manifest_path, "report": report["path"],
                               "counts": results, "sample": sample_info}
    if then_train:
        summary["train"] = _train_and_evaluate(build_path, sample_info, train or {})
    return summary


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
