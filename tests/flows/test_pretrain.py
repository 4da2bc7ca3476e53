"""flows/pretrain.py without training: the torchrun command line and failure on a non-zero exit."""
from __future__ import annotations

import sys

import pytest

from flows import pretrain as pretrain_module

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_torchrun_command_runs_the_flows_entry_point(tmp_path):
    cmd = pretrain_module.torchrun_command(tmp_path / "cfg.json", devices=4, nodes=2, node_rank=1,
                                           master_addr="10.0.0.1", master_port=29400)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29400"} <= set(cmd)
    assert cmd[-4:] == ["-m", "flows.train_entry", "--config", str(tmp_path / "cfg.json")]


def test_multi_device_run_fails_the_flow_on_a_non_zero_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "torchrun_command",
                        lambda *a, **k: [sys.executable, "-c", "import sys; print('rank died'); sys.exit(3)"])
    (tmp_path / "cc4m").mkdir()
    state = pretrain_module.pretrain(build_dir=str(tmp_path / "cc4m"), out_dir=str(tmp_path / "run"), devices=2,
                                     steps=1, registry_dir=str(tmp_path / "registry"), return_state=True)
    assert state.is_failed()
    assert "exited with 3" in str(state.message) or "exited with 3" in repr(state)
    assert "rank died" in (tmp_path / "run" / "torchrun.log").read_text()
    assert not (tmp_path / "registry" / "registry.jsonl").exists()
