"""The developers' guide: no function in the library packages or the flows is longer than 80 lines (aim for ~60).

Counts a function's lines from its `def` (decorators excluded) to its last line, docstring and comments included;
a nested function counts inside its parent and on its own. Run `python tests/test_function_length.py` to list every
function over the limit (or over a lower one: `python tests/test_function_length.py 60`)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("curation", "ovseg_core", "flows", "manifests")
MAX_LINES = 80


def long_functions(limit: int = MAX_LINES) -> list[tuple[str, str, int]]:
    """(file, qualified name, lines) of every function longer than `limit` lines, longest first."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [(str(path.relative_to(REPO_ROOT)), name, lines) for name, lines in _functions(tree)
                      if lines > limit]
    return sorted(found, key=lambda row: -row[2])


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            out.append((name, node.end_lineno - node.lineno + 1))
            out += _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
    return out


# Functions still being split on another branch: the test fails as soon as one of these is short, so that it is
# taken off this list, and at once for any other function over the limit.
PENDING_ELSEWHERE: set[str] = set()


def test_no_function_is_longer_than_80_lines():
    offenders = {f"{path}:{name}": lines for path, name, lines in long_functions()}
    new = [f"{name} ({lines} lines)" for name, lines in offenders.items() if name not in PENDING_ELSEWHERE]
    assert new == [], "split these into steps of at most ~60 lines:\n  " + "\n  ".join(new)
    done = sorted(PENDING_ELSEWHERE - set(offenders))
    assert done == [], f"now short enough: take {done} off PENDING_ELSEWHERE"


def test_the_counter_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f"class A:\n  def long(self):\n{body}\n  def short(self):\n    pass\n")
    assert dict(_functions(tree)) == {"A.long": MAX_LINES + 1, "A.short": 2}


if __name__ == "__main__":
    for path, name, lines in long_functions(int(sys.argv[1]) if len(sys.argv) > 1 else MAX_LINES):
        print(f"{lines:4d}  {path}:{name}")
