"""The `cc4m` router: every subcommand resolves to a real function with its own arguments."""
from __future__ import annotations

import importlib

import pytest

from flows.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_resolves(name: str) -> None:
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    assert callable(getattr(module, command.add_arguments))
    assert callable(getattr(module, command.run))
    parser = build_parser(selected=name)
    sub = parser._subparsers._group_actions[0].choices[name]
    assert sub.get_default("func") is getattr(module, command.run)


def test_help_lists_all_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
