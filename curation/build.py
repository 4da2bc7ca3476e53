"""Run a whole build without Prefect: the stage plan (curation.stages: ingest -> parse -> select -> download ->
verify -> dedup -> index -> reshard -> manifest -> report), in order, in this process (tests, the CLI, benchmarks).
The Prefect flow (flows.build) loops over the same plan. What kind of source it is (a table whose images are
downloaded, or webdataset shards they are extracted from) is the source's business (curation.source).

Every stage is idempotent (a unit whose output exists and matches its inputs is skipped), so a rerun of a finished
build does no work and a rerun after an interruption resumes from the finished units with identical final output.
"""
from __future__ import annotations

import errno
import gzip
import json
import logging
import shutil
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from curation.config import STAGE_CONFIGS, BuildConfig, config_with_overrides, parse_overrides
from curation.diskspace import DiskFull
from curation.download_parts import PartRunner
from curation.ingest import SourceError, source_kind
from curation.io import read_json
from curation.lock import LOCK_NAME, BuildLock, BuildLocked
from curation.progress import ProgressCallback, TerminalProgress
from curation.source import open_source
from curation.stages import STAGE_PLAN, StageRun, build_stage_plan, run_stage
from curation.verify import BuildQualityError
from manifests.layout import BuildLayout

__all__ = ["BuildConfigMismatch", "SourceError", "build_stage_plan", "prepare_build_dir", "run_build"]

log = logging.getLogger(__name__)


class BuildConfigMismatch(ValueError):
    """The build folder was made with a different config; reusing it would mix two builds."""

    def __init__(self, root: Path, changed: list[str]) -> None:
        self.root, self.changed = root, changed
        super().__init__(
            f"{root} was built with a different config (changed: {', '.join(changed)}); use a fresh build folder, "
            f"or allow_config_change=True (cc4m build --allow-config-change) to redo the changed stages and "
            f"everything after them"
        )


def _changed_stages(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = ["source"] if old.get("source") != new.get("source") else []
    changed += [stage for stage in STAGE_CONFIGS if old.get(stage) != new.get(stage)]
    return changed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prepare_build_dir(cfg: BuildConfig, allow_config_change: bool = False) -> BuildLayout:
    """Create the build folder and write config.json; refuse a folder made with another config unless
    `allow_config_change`, in which case the outputs of the first changed stage and every later one are removed."""
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    if layout.config.exists() and not _holds_only_config(layout):  # no output: the new config.json replaces it
        old_cfg = BuildConfig.from_dict(read_json(layout.config))
        changed = _changed_stages(old_cfg.identity(), cfg.identity())
        if changed:
            if not allow_config_change:
                raise BuildConfigMismatch(layout.root, changed)
            first = {"source": "ingest", "shard": "reshard"}
            names = [first.get(c, c) for c in changed]
            plan = STAGE_PLAN
            start = min(i for i, s in enumerate(plan) if s.name in names)
            for stage in plan[start:]:
                for path in stage.outputs(layout):
                    log.warning("build: config of %s changed, removing %s", plan[start].name, path)
                    _remove(path)
    # Rewritten only when what it describes changed: a copied build (another folder) or a new proxy port is the
    # same build, and a rerun of it writes nothing (run.json records each run's folder and run-time settings).
    if not layout.config.exists() or BuildConfig.from_dict(read_json(layout.config)).identity() != cfg.identity():
        cfg.save()
    return layout


def _holds_only_config(layout: BuildLayout) -> bool:
    """True when the folder holds config.json and the build lock and nothing else: a build stopped there before
    any stage wrote anything.

    The config check exists so that two configs' outputs are never mixed in one folder. With no output at all there
    is nothing to mix: such a folder is what a build leaves that failed before its first stage wrote anything (a
    build killed before its first stage, or a mistyped source in a cc4m older than the up-front source check). Refusing there
    would make the user delete the folder or pass --allow-config-change for no protection, so the new config
    replaces the old one. The lock file is required: run_build and the flow write config.json only while holding
    it, so config.json + lock is that story; a config.json alone got there some other way (copied in, or a direct
    prepare_build_dir call, which tests rely on being refused) and anything else in the folder may be output. When
    unsure, refuse rather than mix."""
    return {p.name for p in layout.root.iterdir()} == {layout.config.name, LOCK_NAME}


def run_build(cfg: BuildConfig, *, allow_config_change: bool = False,
              results: dict[str, Any] | None = None, progress: ProgressCallback | None = None,
              parts: PartRunner | None = None) -> Path:
    """Run every stage in order; return the manifest path. `results` (if given) receives each stage's returned
    counts (with "skipped" flags) and its wall time under results["seconds"]; `progress` receives the long stages'
    progress dicts (curation.progress). One build at a time per folder: a second one fails at once naming the holder
    (curation.lock); a killed build's lock and temporaries are taken over. `parts`: the download's parts run by
    that runner (curation.download_parts.dask_parts: on Dask workers)."""
    open_source(cfg.source).check()  # before the lock and config.json: a mistyped source leaves no folder behind
    with BuildLock(cfg.build_dir):
        return _run_stages(cfg, allow_config_change, results, progress, parts)


def _run_stages(cfg: BuildConfig, allow_config_change: bool, results: dict[str, Any] | None,
                progress: ProgressCallback | None, download_parts: PartRunner | None = None) -> Path:
    prepare_build_dir(cfg, allow_config_change)
    out: dict[str, Any] = results if results is not None else {}
    seconds: dict[str, float] = {}
    out["seconds"] = seconds
    for stage in STAGE_PLAN:
        earlier = {name: value for name, value in out.items() if name != "seconds"}
        start = time.perf_counter()
        out[stage.name] = run_stage(stage, StageRun(cfg, progress, earlier, download_parts))
        seconds[stage.name] = round(time.perf_counter() - start, 3)
        log.info("build: %s done in %.2fs", stage.name, seconds[stage.name])
    log.info("build: finished %s (%s)", out["manifest"]["path"], json.dumps(seconds))
    return Path(out["manifest"]["path"])


def add_build_arguments(p: Any) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="CC12M-layout TSV (url<TAB>caption, .tsv or .tsv.gz) or parquet (url, caption), "
                                      "or webdataset shards: a folder of .tar, a glob or a brace pattern such as "
                                      "'DIR/cc12m-{00000..01242}.tar' (local or http(s)); images come from the shards")
    src.add_argument("--sample", metavar="SAMPLE_DIR",
                     help="build the embedded sample: render it into SAMPLE_DIR (reused when complete) and serve "
                          "its images from a local server on 127.0.0.1 for the download stage")
    p.add_argument("--sample-format", choices=["tsv", "wds"], default="tsv",
                   help="with --sample: build from the sample's TSV through its image server (tsv), or from the "
                        "sample written as webdataset shards into SAMPLE_DIR/wds (wds: no server, no download)")
    p.add_argument("--out", required=True, help="build folder (created; a rerun resumes or does nothing)")
    p.add_argument("--config", help="a BuildConfig JSON (e.g. another build's config.json) to start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.SETTING=VALUE",
                   help="override one setting, e.g. --set shard.samples_per_shard=500 --set download.image_size=128")
    p.add_argument("--allow-config-change", action="store_true",
                   help="reuse a build folder made with another config, redoing the changed stages and those after")


# What a user can cause (bad input, full disk, permissions, a busy folder); anything else is a bug and keeps its
# traceback. cli_build catches these types only to ask user_error_message, and re-raises what it does not classify.
_USER_ERROR_TYPES = (OSError, ValueError, EOFError, zlib.error, BuildLocked, BuildQualityError)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM)


def user_error_message(exc: BaseException, source: str | None, build_dir: str) -> str | None:
    """One line saying what went wrong (naming the file or folder) and what to do, for an error the user can fix;
    None for anything else (a bug: the caller re-raises it with its traceback)."""
    if isinstance(exc, (SourceError, BuildLocked, DiskFull, BuildQualityError)):
        return str(exc)
    if isinstance(exc, BuildConfigMismatch):
        return (f"{exc.root} was built with a different config (changed: {', '.join(exc.changed)}). Use a fresh "
                f"--out folder, or rerun with --allow-config-change to redo the changed stages and everything after "
                f"them")
    if isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error)) and source and source_kind(source) == "tsv.gz":
        return (f"source {source} is not a complete gzip file ({exc}): it is truncated or corrupt. Replace it with a "
                f"complete copy (check with: gzip -t {source}) and rerun: the same --out folder is fine, its parts are "
                f"checked by content")
    os_error = _os_error_in(exc)
    if os_error is not None:
        return _os_error_message(os_error, source, build_dir)
    return None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError with an errno a user can fix, in `exc` or what it was raised from (`raise ... from`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (*_NO_SPACE, *_NO_PERMISSION, errno.EROFS):
            return seen
        seen = seen.__cause__
    return None


def _os_error_message(exc: OSError, source: str | None, build_dir: str) -> str:
    where = exc.filename or build_dir
    if exc.errno in _NO_SPACE:
        return (f"no space left on the device holding {where} (build folder {build_dir}). Free some space or use an "
                f"--out folder on a bigger disk, then rerun the same command: finished stages are kept")
    if exc.errno == errno.EROFS:
        return f"{where} is on a read-only file system. Use an --out folder on a writable disk"
    if source and exc.filename and Path(exc.filename) == Path(source):
        return f"cannot read source {source} (permission denied). Make it readable, or copy it to a place you can read"
    return (f"permission denied writing {where} (build folder {build_dir}). Make the build folder writable (or "
            f"choose another --out), then rerun the same command")


def _fail(message: str) -> int:
    print(f"cc4m build: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message held
    return 2


def cli_build(args: Any) -> int:
    """`cc4m build`: a user error (user_error_message) is one line on stderr and exit code 2; a bug raises."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return _cli_build(args)
    except _USER_ERROR_TYPES as exc:
        message = user_error_message(exc, args.source, args.out)
        if message is None:
            raise
        return _fail(message)


def _cli_build(args: Any) -> int:
    try:
        base = read_json(args.config) if args.config else None
        overrides = parse_overrides(args.overrides)
    except (OSError, ValueError) as exc:
        return _fail(f"{exc}. Check --config and --set")
    results: dict[str, Any] = {}
    # On a terminal, one live progress line; elsewhere (CI logs) the stages' own progress log lines suffice.
    terminal = TerminalProgress() if sys.stderr.isatty() else None
    run = {"allow_config_change": args.allow_config_change, "results": results, "progress": terminal}
    if args.sample:
        from curation.sample.make import make_sample
        from curation.sample.server import serving_sample

        info = make_sample(args.sample)
        if args.sample_format == "wds":
            from curation.sample.wds import make_wds_source

            wds = make_wds_source(info, Path(args.sample) / "wds")
            manifest = run_build(config_with_overrides(wds.pattern, args.out, base, overrides), **run)
        else:
            cfg = config_with_overrides(str(info.source_tsv), args.out, base, overrides)
            with serving_sample(info.root, cfg.download.timeout) as proxy_url:
                manifest = run_build(replace(cfg, download=replace(cfg.download, http_proxy=proxy_url)), **run)
    else:
        try:
            cfg = config_with_overrides(args.source, args.out, base, overrides)
        except ValueError as exc:
            return _fail(f"{exc}. Check --source, --out, --config and --set")
        manifest = run_build(cfg, **run)  # checks the source first (SourceError: one line, nothing written)
    _print_summary(manifest, Path(args.out), results)
    return 0


def _print_summary(manifest: Path, build_dir: Path, results: dict[str, Any]) -> None:
    layout = BuildLayout(build_dir)
    print(f"manifest: {manifest}")
    print(f"shards:   {layout.shards_dir} ({len(layout.shards())} shards)")
    print(f"index:    {layout.index_dir}")
    print(f"report:   {layout.report_dir / 'index.html'}")
    print(f"stage seconds: {json.dumps(results.get('seconds', {}))}")
