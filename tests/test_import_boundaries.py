"""The layering the README promises: curation and ovseg_core are plain libraries, flows/ is the only Prefect code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "curation": {"prefect", "prefect_dask", "ovseg_core", "flows"},
    "ovseg_core": {"prefect", "prefect_dask", "curation", "flows"},
    "manifests": {"prefect", "prefect_dask", "curation", "ovseg_core", "flows"},
}


def imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_packages_do_not_import_upwards(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_top_level_names(path) & FORBIDDEN[package])
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# Inside ovseg_core the layers point one way (issue 21 item 5): batch <- data, models <- evaluation <- train.
# ast.walk also sees imports inside functions, so a lazy import cannot hide a loop.
OVSEG_LAYERS = {
    "models": {"ovseg_core.train", "ovseg_core.evaluation", "ovseg_core.data"},
    "evaluation": {"ovseg_core.train", "ovseg_core.data"},
    "data": {"ovseg_core.train", "ovseg_core.evaluation", "ovseg_core.models"},
    "layers": {"ovseg_core.train", "ovseg_core.evaluation", "ovseg_core.models", "ovseg_core.data"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(OVSEG_LAYERS))
def test_ovseg_core_layers_do_not_import_upwards(layer: str) -> None:
    offenders = {}
    for path in sorted((REPO_ROOT / "ovseg_core" / layer).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if any(m.startswith(f) for f in OVSEG_LAYERS[layer]))
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = bad
    assert offenders == {}
