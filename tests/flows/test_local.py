"""flows/local.py: the private Prefect stack deploys flows/prefect.yaml from the repo root and leaves no process."""
from __future__ import annotations

import subprocess

import pytest

from flows.local import LocalPrefect


def _group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_stack_deploys_every_deployment_and_stops_everything(tmp_path):
    from prefect.settings import PREFECT_API_URL

    url_before = PREFECT_API_URL.value()
    with LocalPrefect(tmp_path / "logs") as stack:
        groups = [stack.server.pid, stack.worker.pid]
        assert PREFECT_API_URL.value() == stack.api_url
        listed = stack.prefect("deployment", "ls").stdout
        for name in ("build-cc4m/sample", "build-cc4m/cc12m", "pretrain/default", "evaluate/default",
                     "retrain/scheduled"):
            assert name in listed
        inspected = stack.prefect("deployment", "inspect", "retrain/scheduled").stdout
        assert "0 3 * * 0" in inspected and "UTC" in inspected
    assert not any(_group_alive(pgid) for pgid in groups), "server or worker left running"
    assert PREFECT_API_URL.value() == url_before
    assert stack.database.exists()                       # its own SQLite database, not the shared one
    assert (tmp_path / "logs" / "server.log").exists() and (tmp_path / "logs" / "worker.log").exists()


@pytest.mark.slow
def test_server_scheduler_creates_the_weekly_retrain_runs(tmp_path):
    import json
    import time

    with LocalPrefect(tmp_path / "logs", worker=False) as stack:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = json.loads(stack.prefect("flow-run", "ls", "--flow-name", "retrain", "--state", "SCHEDULED",
                                              "--output", "json").stdout or "[]")
            if any(run["state"]["type"] == "SCHEDULED" for run in listed):
                break
            time.sleep(3)
        else:
            pytest.fail("the server scheduled no retrain/scheduled run; see " + str(stack.log_dir / "server.log"))
