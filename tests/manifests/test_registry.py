from __future__ import annotations

import argparse
import json
import math

import duckdb
import pytest

from manifests.registry import ModelRegistry, add_models_arguments, cli_models, decide_promotion


def _ckpt(tmp_path, name: str, payload: bytes = b"weights"):
    path = tmp_path / "ckpts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload + name.encode())
    return path


@pytest.mark.parametrize(
    ("candidate", "champion", "higher", "expected"),
    [
        (0.5, None, True, True),          # first model always becomes champion
        (0.6, 0.5, True, True),
        (0.5, 0.5, True, False),          # equal is refused
        (0.4, 0.5, True, False),          # worse is refused
        (0.4, 0.5, False, True),          # lower-is-better metric (a loss)
        (None, 0.5, True, False),         # unmeasured candidate
        (math.nan, None, True, False),    # NaN never wins, even with no champion
    ],
)
def test_decide_promotion(candidate, champion, higher, expected):
    assert decide_promotion(candidate, champion, higher_is_better=higher).promote is expected


def test_decide_promotion_min_improvement_and_missing_champion_metric():
    assert not decide_promotion(0.505, 0.5, min_improvement=0.01).promote
    assert decide_promotion(0.52, 0.5, min_improvement=0.01).promote
    # A champion exists but was never measured on this metric: refuse rather than replace it blindly.
    assert not decide_promotion(0.9, None, has_champion=True).promote


def test_register_promote_refuses_worse_and_records_lineage(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.register(_ckpt(tmp_path, "a.pt"), preset="tiny", stage=1, steps=10,
                              build_manifest_sha256="b" * 64, metrics={"val_mIoU": 0.30})
    assert registry.champion() is None
    assert registry.promote_if_better(first.entry_id, "val_mIoU") is True
    assert registry.champion().entry_id == first.entry_id

    worse = registry.register(_ckpt(tmp_path, "b.pt"), preset="tiny", stage=2, steps=20, parent_id=first.entry_id,
                              parent_checkpoint=first.checkpoint, metrics={"val_mIoU": 0.25})
    equal = registry.register(_ckpt(tmp_path, "c.pt"), preset="tiny", stage=2, steps=20, metrics={"val_mIoU": 0.30})
    assert registry.promote_if_better(worse.entry_id, "val_mIoU") is False
    assert registry.promote_if_better(equal.entry_id, "val_mIoU") is False
    assert registry.champion().entry_id == first.entry_id

    better = registry.register(_ckpt(tmp_path, "d.pt"), preset="tiny", stage=2, steps=30, parent_id=first.entry_id,
                               metrics={"val_mIoU": 0.31})
    assert registry.promote_if_better(better.entry_id, "val_mIoU") is True
    assert [e.entry_id for e in registry.list() if e.is_champion] == [better.entry_id]

    decisions = registry.decisions()
    assert [d["promote"] for d in decisions] == [True, False, False, True]
    assert all(d["reason"] for d in decisions)
    assert registry.get(worse.entry_id).parent_id == first.entry_id
    assert len(registry.get(first.entry_id).checkpoint_sha256) == 64
    assert registry.get(first.entry_id).code_version

    # DuckDB reads the ledger directly.
    rows = duckdb.sql("SELECT entry_id, is_champion, metrics.val_mIoU AS v "
                      f"FROM read_json_auto('{registry.registry_path}') ORDER BY entry_id").fetchall()
    assert len(rows) == 4 and rows[-1][1] is True and rows[-1][2] == pytest.approx(0.31)


def test_register_validates(tmp_path):
    registry = ModelRegistry(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        registry.register(tmp_path / "missing.pt", preset="tiny", stage=1, steps=1)
    with pytest.raises(KeyError):
        registry.register(_ckpt(tmp_path, "a.pt"), preset="tiny", stage=1, steps=1, parent_id="nope")
    with pytest.raises(ValueError, match="stage"):
        registry.register(_ckpt(tmp_path, "a.pt"), preset="tiny", stage=3, steps=1)
    assert registry.list() == []          # nothing half-written
    with pytest.raises(KeyError):
        registry.promote_if_better("nope", "val_mIoU")


def test_update_metrics_and_cli(tmp_path, capsys):
    registry = ModelRegistry(tmp_path / "r")
    entry = registry.register(_ckpt(tmp_path, "a.pt"), preset="tiny", stage=1, steps=5, metrics={"val_mIoU": 0.1})
    registry.update_metrics(entry.entry_id, {"eval_mIoU": 0.2})
    assert registry.get(entry.entry_id).metrics == {"val_mIoU": 0.1, "eval_mIoU": 0.2}
    registry.promote_if_better(entry.entry_id, "val_mIoU")

    parser = argparse.ArgumentParser()
    add_models_arguments(parser)
    assert cli_models(parser.parse_args(["--registry", str(registry.root)])) == 0
    out = capsys.readouterr().out
    assert entry.entry_id in out and "eval_mIoU" in out and f"champion: {entry.entry_id}" in out
    assert cli_models(parser.parse_args(["--registry", str(registry.root), "--json"])) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["is_champion"] is True


def _interval(low: float, high: float, miou: float = 0.03) -> dict:
    return {"mIoU": miou, "delta": (low + high) / 2, "low": low, "high": high, "n_images": 80}


def test_promotion_needs_every_lower_bound_above_zero(tmp_path):
    from manifests.registry import decide_with_evidence

    # the case: 0.0349 vs 0.0333 on 80 images, and both below all-background (0.037)
    weak = {"candidate_mIoU": 0.0349, "comparisons": {
        "champion": _interval(-0.004, 0.007, 0.0333), "all_background": _interval(-0.006, 0.001, 0.037),
        "untrained": _interval(0.001, 0.02, 0.02)}}
    decision = decide_with_evidence(weak, has_champion=True)
    assert not decision.promote and "champion" in decision.reason and "all_background" in decision.reason
    strong = {"candidate_mIoU": 0.2, "comparisons": {name: _interval(0.01, 0.05) for name in
                                                     ("champion", "all_background", "untrained")}}
    assert decide_with_evidence(strong, has_champion=True).promote
    no_champion_evidence = {"candidate_mIoU": 0.2, "comparisons": {"untrained": _interval(0.01, 0.05)}}
    assert not decide_with_evidence(no_champion_evidence, has_champion=True).promote  # champion not compared
    assert decide_with_evidence(no_champion_evidence, has_champion=False).promote

    reg = ModelRegistry(tmp_path / "reg")
    first = reg.register(_ckpt(tmp_path, "a.pt"), preset="tiny", stage=1, steps=20)
    second = reg.register(_ckpt(tmp_path, "b.pt"), preset="tiny", stage=2, steps=20, parent_id=first.entry_id)
    assert reg.promote_with_evidence(first.entry_id, {**strong, "comparisons": {
        k: v for k, v in strong["comparisons"].items() if k != "champion"}})
    assert not reg.promote_with_evidence(second.entry_id, weak)
    assert reg.champion().entry_id == first.entry_id and reg.get(second.entry_id).metrics["val_mIoU"] == 0.0349
    log = reg.decisions()
    assert [d["promote"] for d in log] == [True, False]
    assert log[1]["evidence"]["comparisons"]["champion"]["low"] == -0.004  # numbers and interval recorded
    assert log[1]["rule"] == "paired-bootstrap-lower-bound>0" and log[1]["champion_id"] == first.entry_id
