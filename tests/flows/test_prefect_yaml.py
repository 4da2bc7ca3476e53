"""flows/prefect.yaml: every deployment's entrypoint imports and is the right flow, its parameters validate against the
flow's signature, the retrain deployment carries its weekly cron schedule. Plus the Docker files' contract."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.local import PREFECT_FILE
from manifests.version import REPO_ROOT

EXPECTED = {
    ("build-cc4m", "sample"), ("build-cc4m", "cc12m"), ("build-cc4m", "cc12m-wds"), ("pretrain", "default"), ("pretrain", "paper"),
    ("evaluate", "default"),
    ("retrain", "scheduled"),
}


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_FILE.read_text())["deployments"]


def _load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, _, function = entrypoint.partition(":")
    assert not Path(path).is_absolute() and (REPO_ROOT / path).is_file(), entrypoint
    return load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}")


def test_every_expected_deployment_is_declared_on_the_process_pool():
    declared = set()
    for dep in _deployments():
        flow = _load_flow(dep["entrypoint"])
        declared.add((flow.name, dep["name"]))
        assert dep["work_pool"]["name"] == "cc4m-process"
    assert declared == EXPECTED


@pytest.mark.parametrize("dep", _deployments(), ids=lambda d: f"{d['entrypoint']}:{d['name']}")
def test_parameters_validate_against_the_flow_signature(dep):
    flow = _load_flow(dep["entrypoint"])
    params = dep.get("parameters") or {}
    validated = flow.validate_parameters(params)   # raises ParameterTypeError on a bad name or type
    assert set(params) <= set(validated)


def test_retrain_is_scheduled_weekly_in_utc():
    (retrain,) = [d for d in _deployments() if d["name"] == "scheduled"]
    (schedule,) = retrain["schedules"]
    assert schedule["cron"] == "0 3 * * 0" and schedule["timezone"] == "UTC" and schedule.get("active", True)
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # valid cron + timezone


def test_wds_deployment_names_webdataset_shards():
    from curation.source import WebDatasetSource, open_source

    (dep,) = [d for d in _deployments() if d["name"] == "cc12m-wds"]
    assert isinstance(open_source(dep["parameters"]["source"]), WebDatasetSource)
    assert dep.get("concurrency_limit") == 1


def test_pull_step_sets_the_working_directory_to_the_repo_root():
    doc = yaml.safe_load(PREFECT_FILE.read_text())
    (step,) = doc["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $CC4M_ROOT }}"


# ------------------------------------------------------------------------------------------------------------ docker
DOCKER = REPO_ROOT / "docker"


@pytest.mark.parametrize("name", ["Dockerfile.curation", "Dockerfile.train"])
def test_images_install_the_same_lock_file_without_dependency_resolution(name):
    text = (DOCKER / name).read_text()
    assert "requirements.lock.txt" in text and "--no-deps" in text
    assert "pip uninstall -y dataclasses" in text  # the backport that breaks Prefect's server (environment.md)


def test_compose_file_structure():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "dask-scheduler", "dask-worker-1", "dask-worker-2"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert "postgresql+asyncpg" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "prefect-server" in services["worker"]["environment"]["PREFECT_API_URL"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose.get("volumes", {}) or source.startswith("."), (name, volume)
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
