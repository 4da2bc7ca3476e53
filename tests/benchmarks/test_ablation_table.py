"""The ablation table's regression check: a row that stops beating the one below it (a broken MEC or mask loss) is
reported as lost and fails --check."""
from __future__ import annotations

import json

import pytest

from benchmarks.ablation_table import check, collect, main, markdown


def _scores(miou: float) -> dict:
    interval = {"delta": miou - 0.04, "low": miou - 0.06, "high": miou - 0.02}
    split = {"miou": miou, "untrained_miou": 0.03, "background_miou": 0.04,
             "bootstrap_95": {"trained_vs_untrained_same_init": interval, "trained_vs_all_background": interval}}
    return {"test": split, "fresh": split}


def _result(seed: int, overrides: dict, stage1: float, stage2: float | None = None) -> dict:
    per_checkpoint = {"stage1": _scores(stage1)}
    if stage2 is not None:
        per_checkpoint["stage2"] = _scores(stage2)
    return {"model_overrides": overrides, "stage1": {"config": {"seed": seed}}, "per_checkpoint_scores": per_checkpoint}


def _runs(mec_gain: float, mask_gain: float) -> list[dict]:
    runs = []
    for seed in range(3):
        base = 0.2 + 0.01 * seed
        runs.append(_result(seed, {"mec_weight": 0, "entity_prompt_weight": 0}, base))
        runs.append(_result(seed, {"entity_prompt_weight": 0}, base + mec_gain, base + mec_gain + mask_gain))
    return runs


def test_rows_that_hold_pass_the_check():
    table = collect(_runs(mec_gain=0.03, mask_gain=0.02))
    assert set(table) == {"ITC only", "ITC + MEC", "+ mask (stage 2)"}
    assert check(table, ["ITC + MEC > ITC only", "+ mask (stage 2) > ITC + MEC"]) == []
    assert "**ITC + MEC > ITC only** holds" in markdown(table)


@pytest.mark.parametrize(("mec_gain", "mask_gain", "lost"), [
    (-0.01, 0.02, ["ITC + MEC > ITC only"]),  # a broken MEC: ITC + MEC no better than ITC alone
    (0.03, 0.0, ["+ mask (stage 2) > ITC + MEC"]),  # a broken mask loss: stage 2 adds nothing
])
def test_a_broken_loss_shows_up_as_a_lost_row(tmp_path, mec_gain, mask_gain, lost):
    runs = _runs(mec_gain, mask_gain)
    assert check(collect(runs), ["ITC + MEC > ITC only", "+ mask (stage 2) > ITC + MEC"]) == lost
    paths = []
    for index, run in enumerate(runs):
        path = tmp_path / f"r{index}.json"
        path.write_text(json.dumps(run))
        paths.append(str(path))
    assert main([*paths, "--markdown", str(tmp_path / "t.md"), "--check"]) == 1
    assert "does NOT hold" in (tmp_path / "t.md").read_text()
    good = collect(_runs(0.03, 0.02))
    # One seed reversing is enough to lose the row.
    good["ITC + MEC"][1]["fresh"] = dict(good["ITC + MEC"][1]["fresh"], miou=0.0)
    assert check(good, ["ITC + MEC > ITC only"]) == ["ITC + MEC > ITC only"]


def test_the_recipe_rows_carry_the_same_two_claims():
    runs = []
    for seed in range(3):
        runs.append(_result(seed, {"mec_weight": 0, "entity_prompt_weight": 1.0}, 0.25))
        runs.append(_result(seed, {"entity_prompt_weight": 1.0}, 0.30, 0.29 if seed == 2 else 0.32))
    table = collect(runs)
    assert set(table) == {"recipe without MEC", "recipe (+ entity prompts)", "recipe + stage 2"}
    # seed 2's stage 2 is worse than its stage 1: the stage-2 claim is lost, the MEC claim holds
    assert check(table, ["recipe > recipe without MEC", "recipe + stage 2 > recipe"]) == ["recipe + stage 2 > recipe"]


def test_the_no_mask_control_is_its_own_row_and_tells_the_mask_from_the_extra_steps():
    runs = []
    for seed in range(3):
        runs.append(_result(seed, {"entity_prompt_weight": 1.0}, 0.30, 0.33))
        # the control's stage 1 (0.99) must not overwrite the recipe row; its stage 2 gains as much as the mask's
        runs.append(_result(seed, {"entity_prompt_weight": 1.0, "mask_weight": 0}, 0.99, 0.33 - 0.01 * (seed == 1)))
    table = collect(runs)
    assert set(table) == {"recipe (+ entity prompts)", "recipe + stage 2", "recipe + stage 2 without the mask"}
    assert table["recipe (+ entity prompts)"][0]["test"]["miou"] == 0.30
    mask_claim = "recipe + stage 2 > recipe + stage 2 without the mask"
    # stage 2 beats stage 1, but the control ties on seeds 0 and 2: the mask's own gain does not hold
    assert check(table, ["recipe + stage 2 > recipe", mask_claim]) == [mask_claim]


def test_a_row_that_stops_beating_the_baselines_is_lost():
    runs = [_result(seed, {"entity_prompt_weight": 1.0}, 0.30, 0.31) for seed in range(3)]
    table = collect(runs)
    assert check(table, ["recipe (+ entity prompts) learns", "recipe + stage 2 learns"]) == []
    # seed 1's fresh render falls to the baselines: its interval reaches 0, the row is lost
    table["recipe + stage 2"][1]["fresh"] = dict(table["recipe + stage 2"][1]["fresh"], low=-0.01)
    assert check(table, ["recipe (+ entity prompts) learns", "recipe + stage 2 learns"]) == ["recipe + stage 2 learns"]
    assert check(table, ["recipe without MEC learns"]) == ["recipe without MEC learns"]  # not measured: not held
    with pytest.raises(ValueError, match="unknown claims"):
        check(table, ["recipe flies"])


def test_the_colour_affinity_ablation_is_its_own_row_and_a_lost_prior_shows():
    runs = []
    for seed in range(3):
        runs.append(_result(seed, {"entity_prompt_weight": 1.0, "colour_affinity_weight": 0}, 0.20))
        runs.append(_result(seed, {"entity_prompt_weight": 1.0}, 0.25))
    table = collect(runs)
    assert set(table) == {"recipe without colour affinity", "recipe (+ entity prompts)"}
    assert check(table, ["recipe > recipe without colour affinity"]) == []
    runs[-1] = _result(2, {"entity_prompt_weight": 1.0}, 0.19)  # the prior broken on one seed
    assert check(collect(runs), ["recipe > recipe without colour affinity"]) == [
        "recipe > recipe without colour affinity"]
