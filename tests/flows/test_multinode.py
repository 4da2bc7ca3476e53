"""Multi-node training on one machine: the `pretrain` flow with nodes=2 (two torchrun node processes, gloo, the
rendezvous store on 127.0.0.1) trains, and matches 1 node x 2 processes at the same global batch: same ranks, same
data shards, same all-reduce, so the same losses and the same weights."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 8
TRAIN = {"augment": "crop", "max_text_len": 24, "val_percent": 20.0, "shuffle_buffer": 8, "log_every": 1,
         "save_every": 0, "eval_every": 0, "scale_lr": False, "device": "cpu", "threads": 1,
         "model_overrides": [["text_trainable_layers", 0]]}

NODE = """
import json, sys
from flows.pretrain import pretrain
args = json.loads(sys.argv[1])
print(json.dumps(pretrain(**args)["metrics"], default=str))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixture_build(root: Path) -> Path:
    spec = importlib.util.spec_from_file_location("ovseg_fixture", REPO / "tests" / "ovseg_core" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_fixture_build(root, num_samples=32)


def _node(args: dict, home: Path) -> subprocess.Popen:
    """One node: the pretrain flow in a process of its own, reporting to the test harness's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1",
        "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return subprocess.Popen([sys.executable, "-c", NODE, json.dumps(args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    result = json.loads((run / "result.json").read_text())
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)
    return state.get("model", state)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_two_nodes_train_and_match_one_node_with_two_processes(tmp_path):
    build = _fixture_build(tmp_path / "build")
    common = {"build_dir": str(build), "preset": "tiny", "stage": 1, "steps": STEPS, "batch_size": BATCH,
              "train_overrides": TRAIN, "registry_dir": str(tmp_path / "registry"), "master_addr": "127.0.0.1"}
    one_node = _node({**common, "out_dir": str(tmp_path / "one"), "devices": 2, "nodes": 1,
                      "master_port": _free_port()}, tmp_path / "prefect-one")
    out, _ = one_node.communicate(timeout=900)
    assert one_node.returncode == 0, out[-3000:]

    port = _free_port()
    nodes = [_node({**common, "out_dir": str(tmp_path / f"node{rank}"), "devices": 1, "nodes": 2,
                    "node_rank": rank, "master_port": port}, tmp_path / f"prefect-node{rank}") for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [o[-3000:] for o in outputs]

    for rank in (0, 1):  # each node ran its own torchrun, one process, as node `rank` of two
        config = json.loads((tmp_path / f"node{rank}" / "train_config.json").read_text())
        assert config["out_dir"] == str(tmp_path / f"node{rank}")
        assert "--nnodes=2" in outputs[rank] and f"--node_rank={rank}" in outputs[rank], outputs[rank][-2000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "node0" / "result.json").read_text())
    assert not (tmp_path / "node1" / "result.json").exists()  # the first node's rank 0 writes the results
    assert one["final_step"] == two["final_step"] == STEPS
    losses_one = [r["loss"] for r in one["losses"]]
    losses_two = [r["loss"] for r in two["losses"]]
    assert len(losses_one) == STEPS and losses_one == pytest.approx(losses_two, rel=1e-5, abs=1e-6)
    assert losses_one[0] != losses_one[-1]  # it trained
    w_one, w_two = _weights(tmp_path / "one"), _weights(tmp_path / "node0")
    assert w_one.keys() == w_two.keys()
    for name in w_one:
        assert torch.allclose(w_one[name].float(), w_two[name].float(), rtol=1e-5, atol=1e-6), name
