"""A private local Prefect stack for the demo: SQLite server + `process` work pool + deployments + worker.

    with LocalPrefect(log_dir) as stack:          # server on 127.0.0.1:<free port>, pool, deploy --all, worker
        state = stack.run("build-cc4m/sample", {"build_dir": ...})

The production stack (docker/compose.yaml) runs the server on PostgreSQL; `LocalPostgres` runs that database from the
distribution's packages (Debian: postgresql) without Docker, and LocalPrefect(database_url=...) points the server at
it:

    with LocalPostgres(folder) as pg, LocalPrefect(log_dir, database_url=pg.async_url()) as stack: ...

Server and worker are started with `setsid` (their own process groups: the worker's signal forwarding must not
hit us) and are ALWAYS stopped on exit: SIGTERM to the group, wait, then SIGKILL (the worker ignores the first
SIGTERM). Each stack has its own SQLite database (<log_dir>/prefect.db: two stacks never share one, and a rerun
of the demo skips the migrations); PREFECT_HOME (result storage) is the repo's .prefect-home unless set; analytics
and the UI are off. In this process, `run()` talks to the stack through prefect's temporary_settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

from manifests.version import REPO_ROOT

POOL_NAME = "cc4m-process"
DEMO_OVERLAYS = 16  # the evaluation report's 4 x 4 contact sheet
PREFECT_FILE = REPO_ROOT / "flows" / "prefect.yaml"
PREFECT_BIN = Path(sys.executable).with_name("prefect")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, wait up to `grace_s`, then SIGKILL it; reap the leader."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)  # setsid: pgid == pid
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children of the leader (uvicorn workers, flow-run subprocesses) share the group; make sure none survive.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until_ready(probe: Callable[[], bool], proc: subprocess.Popen | None, timeout_s: float, what: str,
                     log: str | Path) -> None:
    """Poll `probe` until it says ready; fail at once if `proc` exits, or after `timeout_s`, naming the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        if probe():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s} s; see {log}")

class LocalPrefect:
    """Context manager owning a local Prefect server and a process worker (see module docstring)."""

    def __init__(self, log_dir: str | os.PathLike, port: int | None = None, pool: str = POOL_NAME,
                 prefect_file: Path = PREFECT_FILE, startup_timeout_s: float = 120.0, deploy: bool = True,
                 worker: bool = True, database_url: str | None = None) -> None:
        self.log_dir = Path(log_dir).resolve()
        self.port = port or free_port()
        self.pool = pool
        self.prefect_file = prefect_file
        self.startup_timeout_s = startup_timeout_s
        self.deploy_on_start = deploy
        self.start_worker = worker
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.database = self.log_dir / "prefect.db"
        # None: the demo's own SQLite file; else e.g. LocalPostgres.async_url() (postgresql+asyncpg://...).
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.database}"
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._settings = ExitStack()

    # ---------------------------------------------------------------------------------------------------- env
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_HOME": env.get("PREFECT_HOME", str(REPO_ROOT / ".prefect-home")),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            # The scheduler looks for deployments with schedules every 60 s by default; deployments are made after
            # the server starts, so a short loop lets a local stack see retrain/scheduled's runs promptly.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "CC4M_ROOT": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
        })
        return env

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / log_name, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(), cwd=REPO_ROOT, start_new_session=True)  # = setsid

    def prefect(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run a `prefect` CLI command against this server (from the repo root); raise with its output on failure."""
        done = subprocess.run([str(PREFECT_BIN), "--no-prompt", *args], capture_output=True, text=True,
                              env=self.env(), cwd=REPO_ROOT, timeout=timeout_s, check=False)
        with open(self.log_dir / "cli.log", "a", encoding="utf-8") as log:
            log.write(f"$ prefect {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        try:
            self.server = self._spawn([str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(self.port), "--no-ui"], "server.log")
            self._wait_healthy()
            # In-process clients (run_deployment, results) talk to this server while the stack is up.
            from prefect.settings import PREFECT_API_URL, temporary_settings

            self._settings.enter_context(temporary_settings({PREFECT_API_URL: self.api_url}))
            self.prefect("work-pool", "create", self.pool, "--type", "process", "--overwrite")
            if self.deploy_on_start:
                self.prefect("deploy", "--all", "--prefect-file", str(self.prefect_file))
            if self.start_worker:
                self.worker = self._spawn([str(PREFECT_BIN), "worker", "start", "--pool", self.pool, "--type",
                                           "process"], "worker.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _wait_healthy(self) -> None:
        wait_until_ready(self._healthy, self.server, self.startup_timeout_s, "prefect server",
                         f"{self.log_dir}/server.log")

    def stop(self) -> None:
        for proc in (self.worker, self.server):  # worker first: it would log errors without its server
            if proc is not None:
                stop_process_group(proc)
        self.worker = self.server = None
        self._settings.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------------- runs
    def run(self, deployment: str, parameters: dict[str, Any] | None = None, timeout_s: float = 3600.0) -> Any:
        """Run a deployment ("flow/deployment") on the worker and wait for its final state (raises if not
        Completed). Returns the final flow-run state."""
        from prefect.deployments import run_deployment

        flow_run = run_deployment(deployment, parameters=parameters or {}, timeout=timeout_s, poll_interval=2,
                                  as_subflow=False)
        if not flow_run.state or not flow_run.state.is_completed():
            name = flow_run.state.name if flow_run.state else "unknown"
            raise RuntimeError(f"deployment {deployment} ended {name} (flow run {flow_run.id}); see "
                               f"{self.log_dir}/worker.log")
        return flow_run

    def result(self, flow_run: Any) -> Any:
        """The flow run's return value (persisted by the flow: results are stored in PREFECT_HOME/storage)."""
        return flow_run.state.result()


# ------------------------------------------------------------------------------------------------------ PostgreSQL
def postgres_bin(name: str) -> Path:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<version>/bin, off the PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    found = candidates[-1] if candidates else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} not found: install the distribution's package "
                                f"(Debian: apt-get install postgresql; .ci/setup does this)")
    return Path(found)


class LocalPostgres:
    """A throw-away PostgreSQL server: initdb in a fresh folder, listening on 127.0.0.1:<free port> only (trust
    authentication: local tests only), started with setsid and stopped by PID (fast shutdown, then SIGKILL).

    PostgreSQL refuses to run as root; as root, its folder is created under /tmp (pytest's own temp folders are
    private to root) and owned by the `postgres` system user (created by the Debian package), which runs it."""

    def __init__(self, folder: str | os.PathLike, port: int | None = None, database: str = "prefect",
                 run_as: str = "postgres", startup_timeout_s: float = 60.0) -> None:
        self.log_path = Path(folder).resolve() / "postgres.log"
        self.port = port or free_port()
        self.database = database
        self.run_as = run_as if os.geteuid() == 0 else None
        self.startup_timeout_s = startup_timeout_s
        self.data_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def _user_kwargs(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        import pwd

        entry = pwd.getpwnam(self.run_as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> str:
        done = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=120,
                              **self._user_kwargs())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = Path(tempfile.mkdtemp(prefix="cc4m-pg-")) if self.run_as else self.log_path.parent
        if self.run_as:
            import pwd

            entry = pwd.getpwnam(self.run_as)
            os.chown(parent, entry.pw_uid, entry.pw_gid)
        self.data_dir = parent / "data"
        try:
            self._run(str(postgres_bin("initdb")), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(postgres_bin("postgres")), "-D", str(self.data_dir), "-p", str(self.port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir}",
                     "-c", "fsync=off", "-c", "max_connections=50"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    **self._user_kwargs())
            self._wait_ready()
            self.sql(f"CREATE DATABASE {self.database}", database="postgres")
        except BaseException:
            self.stop()
            raise
        return self

    def _accepts_connections(self) -> bool:
        ready = subprocess.run([str(postgres_bin("pg_isready")), "-h", "127.0.0.1", "-p", str(self.port),
                                "-U", "postgres"], capture_output=True, check=False)
        return ready.returncode == 0

    def _wait_ready(self) -> None:
        wait_until_ready(self._accepts_connections, self.proc, self.startup_timeout_s, "postgres", self.log_path)

    def sql(self, query: str, database: str | None = None) -> list[list[str]]:
        """Run one SQL statement with psql over TCP; rows as lists of strings."""
        out = subprocess.run([str(postgres_bin("psql")), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", database or self.database, "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                              "-c", query], capture_output=True, text=True, check=False, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed ({out.returncode}): {out.stderr}")
        return [line.split("\t") for line in out.stdout.splitlines()]

    def async_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):  # SIGINT = "fast" shutdown
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=wait_s)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent if self.run_as else self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------- cc4m demo
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".cc4m-runs" / "demo",
                   help="demo folder: sample, build, checkpoints, evaluation, registry, logs")
    p.add_argument("--sample-rows", type=int, default=None, help="first N rows of the embedded sample (default all)")
    p.add_argument("--minutes", type=float, default=4.0, help="time limit of pretraining")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N eval images (default all)")
    p.add_argument("--skip-train", action="store_true", help="only build CC4M")
    p.add_argument("--no-server", action="store_true",
                   help="run the flows in-process (ephemeral Prefect API) instead of server + worker + deployments")


def cli_demo(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    build_dir, registry = out / "cc4m", out / "registry"
    build_params: dict[str, Any] = {"sample": True, "build_dir": str(build_dir), "sample_dir": str(out / "sample"),
                                    "sample_rows": args.sample_rows}
    # No out_dir: the pretrain flow keys its run folder by the build's manifest (<out>/train/<preset>-stage1-<sha>),
    # so a demo rerun after a rebuild starts a new run instead of resuming one trained on the old build.
    train_params: dict[str, Any] = {"build_dir": str(build_dir), "time_limit_s": args.minutes * 60,
                                    "registry_dir": str(registry), "recipe": "sample"}
    started = time.monotonic()
    if args.no_server:
        from flows.build import build_cc4m
        from flows.evaluate import evaluate
        from flows.pretrain import pretrain

        built = build_cc4m(**build_params)
        trained = None if args.skip_train else pretrain(**train_params)
        evaluated = None if args.skip_train else evaluate(**_eval_params(built, trained, out, registry,
                                                                          args.eval_images))
    else:
        with LocalPrefect(out / "logs") as stack:
            print(f"[demo] Prefect server {stack.api_url} (logs: {stack.log_dir}); running build-cc4m/sample")
            built = stack.result(stack.run("build-cc4m/sample", build_params))
            trained = evaluated = None
            if not args.skip_train:
                print(f"[demo] pretrain/default: tiny preset, sample recipe, {args.minutes} min")
                trained = stack.result(stack.run("pretrain/default", train_params))
                print("[demo] evaluate/default")
                evaluated = stack.result(stack.run("evaluate/default",
                                                   _eval_params(built, trained, out, registry, args.eval_images)))
    _print_summary(built, trained, evaluated, registry, time.monotonic() - started)
    return 0


def _eval_params(built: dict[str, Any], trained: dict[str, Any], out: Path, registry: Path,
                 max_images: int | None) -> dict[str, Any]:
    from ovseg_core.evaluation.selection import SAMPLE_CANDIDATES  # lazily: torch is heavy

    return {"checkpoint": trained["checkpoint"], "out_dir": str(out / "eval"), "registry_dir": str(registry),
            "entry_id": trained["entry_id"], "max_images": max_images, "overlays": DEMO_OVERLAYS,
            "datasets": [{"layout": "sample", "root": built["sample"]["eval_dir"], "split": "val",
                          "select_split": "train", "name": "sample-eval",
                          "candidates": {k: list(v) for k, v in SAMPLE_CANDIDATES.items()}}]}


def _class_ranking_lines(per_class: dict[str, float | None]) -> list[str]:
    """'best 5' and 'worst 5' lines of per-class IoU (background left out): where the model works, where not."""
    if not per_class:
        return []
    from ovseg_core.evaluation.metrics import best_and_worst_classes  # lazily: torch is heavy

    best, worst = best_and_worst_classes(per_class, 5)
    return [f"  best 5      : {', '.join(f'{name} {iou:.2f}' for name, iou in best)}",
            f"  worst 5     : {', '.join(f'{name} {iou:.2f}' for name, iou in worst)}"]


def _print_summary(built: dict[str, Any], trained: dict[str, Any] | None, evaluated: dict[str, Any] | None,
                   registry: Path, seconds: float) -> None:
    build = Path(built["build_dir"])
    counts = json.loads(Path(built["manifest"]).read_text(encoding="utf-8"))["counts"]  # the checked numbers
    lines = [
        f"[demo] done in {seconds:.0f} s",
        (f"  CC4M shards : {build / 'shards'}  ({counts['reshard']['written']} samples in "
         f"{counts['reshard']['shards']} shards)"),
        f"  index       : {build / 'index'}  (entity_index, partners, cooccurrence, locator)",
        f"  manifest    : {built['manifest']}",
        f"  report      : {built['report']}",
        (f"  counts      : read {counts['ingest']['read']} (rejected {counts['ingest']['rejected']}) -> selected "
         f"{counts['select']['selected']} -> downloaded {counts['download']['success']} (failed "
         f"{counts['download']['failed']}) -> duplicates removed {counts['dedup']['removed_duplicate']} -> written "
         f"{counts['reshard']['written']}"),
    ]
    if trained:
        lines.append(f"  checkpoint  : {trained['checkpoint']}  (registry entry {trained['entry_id']}: "
                     f"cc4m models --registry {registry})")
    if evaluated:
        for name, result in evaluated["datasets"].items():
            lines.append(f"  mIoU        : {result['mIoU']:.4f} on {name} ({result['split']}); per-class IoU "
                         f"{result['per_class_csv']}")
            if result["overlays"]:
                lines.append(f"  overlays    : {Path(result['overlays'][0]).parent} ({len(result['overlays'])} PNG: "
                             f"image | prediction | ground truth, with a legend)")
            if result.get("contact_sheet"):
                lines.append(f"  contact     : {result['contact_sheet']} (4 x 4 overlays)")
            lines += _class_ranking_lines(result.get("per_class") or {})
    print("\n".join(lines))

