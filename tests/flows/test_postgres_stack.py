"""The production stack without Docker: PostgreSQL from the distribution's packages on 127.0.0.1, a Prefect server
on it, flows/prefect.yaml deployed, build-cc4m/sample run by a process worker, and the run checked in the database."""
from __future__ import annotations

import json
import subprocess

import pytest

from flows.local import LocalPostgres, LocalPrefect


def _alive(pid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_build_runs_on_a_prefect_server_backed_by_postgres(tmp_path, small_config):
    with LocalPostgres(tmp_path / "pg") as pg:
        postgres_pid = pg.proc.pid
        with LocalPrefect(tmp_path / "logs", database_url=pg.async_url()) as stack:
            groups = [stack.server.pid, stack.worker.pid]
            flow_run = stack.run("build-cc4m/sample", {
                "build_dir": str(tmp_path / "cc4m"), "sample_dir": str(tmp_path / "sample"), "sample_rows": 200,
                "config": small_config})
        run_id = str(flow_run.id)

        # The server wrote to PostgreSQL (and not to the SQLite file it uses by default).
        assert not stack.database.exists()
        (state_type, state_name, deployment), = pg.sql(
            "SELECT f.state_type, f.state_name, d.name FROM flow_run f JOIN deployment d ON d.id = f.deployment_id "
            f"WHERE f.id = '{run_id}'")
        assert (state_type, state_name, deployment) == ("COMPLETED", "Completed", "sample")
        deployments = {name for (name,) in pg.sql("SELECT name FROM deployment")}
        assert {"sample", "cc12m", "cc12m-wds", "default", "scheduled"} <= deployments
        artifacts = pg.sql(f"SELECT type, coalesce(key, ''), data FROM artifact WHERE flow_run_id = '{run_id}'")
        by_key = {key: (kind, data) for kind, key, data in artifacts if key}
        assert by_key["build-cc4m-report"][0] == "markdown" and "cc4m build report" in by_key["build-cc4m-report"][1]
        table = json.loads(json.loads(by_key["build-cc4m-counts"][1]))  # jsonb holding Prefect's JSON text
        assert any(row["stage"] == "reshard" and row["count"] == "written" and row["value"] > 0 for row in table)
        progress = [float(data) for kind, _, data in artifacts if kind == "progress"]
        assert progress and all(p == 100.0 for p in progress)  # download, verify... every long stage finished
        tasks = {name.rsplit("-", 1)[0]: state  # task run names are "<task>-<3 hex digits>"
                 for name, state in pg.sql(f"SELECT name, state_type FROM task_run WHERE flow_run_id = '{run_id}'")}
        assert tasks["reshard"] == "COMPLETED" and tasks["download"] == "COMPLETED"
    assert not any(_alive(pid) for pid in [*groups, postgres_pid]), "server, worker or postgres left running"
