"""The README is a front door: at most 200 lines, its two commands are the ones CI and the demo run, and every
local link it gives resolves."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_is_a_short_front_door():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_the_two_commands_are_what_ci_and_the_demo_run():
    text = README.read_text(encoding="utf-8")
    block = text.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["bash .ci/demo", "bash .ci/run"]
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pytest" in run and "bash .ci/setup" in run  # the test command sets up, then runs the tests


def test_every_local_link_resolves():
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to a missing {target}"
