"""Registry of named model presets (timm style: each preset is a small function returning an OVSegConfig)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ovseg_core.config import OVSegConfig, refuse_released_names

_PRESETS: dict[str, Callable[[], OVSegConfig]] = {}


def register_model(fn: Callable[[], OVSegConfig]) -> Callable[[], OVSegConfig]:
    """Decorator: register a preset under its function name."""
    name = fn.__name__
    if name in _PRESETS:
        raise ValueError(f"model preset {name!r} is already registered")
    _PRESETS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def is_model(name: str) -> bool:
    return name in _PRESETS


def get_model_config(name: str, **overrides: object) -> OVSegConfig:
    """The preset's config with `overrides` applied (dataclasses.replace, so they are validated again)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    refuse_released_names(overrides)
    cfg = _PRESETS[name]()
    known = {f.name for f in dataclasses.fields(OVSegConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config overrides {unknown} for model {name!r}; valid fields: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides)
