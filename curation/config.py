"""BuildConfig: one frozen config for a whole build, composed of every stage's own config. Saved as config.json in
the build folder (and copied into manifest.json), validated up front so a bad setting fails before any work."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from curation.dedup import DedupConfig
from curation.download import DownloadConfig
from curation.index import IndexConfig
from curation.ingest import IngestConfig
from curation.io import write_json_atomic
from curation.parse import ParseConfig
from curation.reshard import ShardConfig
from curation.select import SelectConfig
from curation.verify import VerifyConfig
from manifests.layout import BuildLayout
from manifests.locations import is_url

STAGE_CONFIGS: dict[str, type] = {
    "ingest": IngestConfig, "parse": ParseConfig, "select": SelectConfig, "download": DownloadConfig,
    "verify": VerifyConfig, "dedup": DedupConfig, "index": IndexConfig, "shard": ShardConfig,
}
# Settings that change how fast a build runs, never what it produces: a build folder may be resumed with other values.
RUNTIME_ONLY: dict[str, frozenset[str]] = {
    "ingest": frozenset({"progress"}),
    "parse": frozenset({"batch_size", "chunk_rows"}),
    "download": frozenset({"http_proxy", "processes_count", "thread_count", "distributor", "subprocess_timeout_s",
                          "retry_transient", "max_attempts", "progress_interval_s", "stall_timeout_s",
                          "shards_per_part"}),
    "dedup": frozenset({"workers"}),  # how many processes hash, not what they hash
    "shard": frozenset({"rehash_existing"}),
}

# Flat convenience overrides (what people type in a flow's parameters) -> their place in BuildConfig.to_dict().
OVERRIDE_SHORTCUTS: dict[str, tuple[str, str]] = {
    "samples_per_shard": ("shard", "samples_per_shard"),
    "processes": ("download", "processes_count"),
    "threads": ("download", "thread_count"),
    "image_size": ("download", "image_size"),
    "distributor": ("download", "distributor"),
    "rows_per_part": ("ingest", "rows_per_part"),
}


def _config_to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    else:
        d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    # JSON has no tuples / mapping proxies: normalise so that to_dict -> JSON -> from_dict round-trips exactly.
    return json.loads(json.dumps(d, default=lambda o: dict(o) if hasattr(o, "keys") else list(o)))


def _config_from_dict(cls: type, d: dict[str, Any], stage: str) -> Any:
    if not isinstance(d, dict):
        # ValueError, not TypeError: the team contract has every config error raise ValueError.
        raise ValueError(f"BuildConfig.{stage} must be an object, got {type(d).__name__}")  # noqa: TRY004
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"BuildConfig.{stage}: unknown settings {unknown} (known: {sorted(known)})")
    # Frozen configs hold tuples where JSON has lists.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class BuildConfig:
    """source: CC12M-layout TSV (url<TAB>caption) or parquet; build_dir: the build folder (see manifests.layout)."""

    source: str
    build_dir: str
    ingest: IngestConfig = field(default_factory=IngestConfig)
    parse: ParseConfig = field(default_factory=ParseConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)

    def __post_init__(self) -> None:
        for name in ("source", "build_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ValueError(f"BuildConfig.{name} must be a non-empty path, got {value!r}")
            object.__setattr__(self, name, str(value))
        for stage, cls in STAGE_CONFIGS.items():
            value = getattr(self, stage)
            if isinstance(value, dict):  # convenience: BuildConfig(..., download={"image_size": 64})
                object.__setattr__(self, stage, _config_from_dict(cls, value, stage))
            elif not isinstance(value, cls):
                raise ValueError(  # noqa: TRY004 (contract: configs raise ValueError)
                    f"BuildConfig.{stage} must be a {cls.__name__}, got {type(value).__name__}")
        if Path(self.source).resolve() == Path(self.build_dir).resolve():
            raise ValueError("BuildConfig.source and build_dir must differ")
        if Path(self.build_dir).resolve() in Path(self.source).resolve().parents:
            # ingest refuses unknown files in its folders; keeping the source out of the build avoids surprises.
            raise ValueError(f"BuildConfig.source {self.source} must not live inside build_dir {self.build_dir}")

    @property
    def layout(self) -> BuildLayout:
        return BuildLayout(Path(self.build_dir))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "build_dir": self.build_dir}
        for stage in STAGE_CONFIGS:
            out[stage] = _config_to_dict(getattr(self, stage))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        unknown = sorted(set(d) - {"source", "build_dir", *STAGE_CONFIGS})
        if unknown:
            raise ValueError(f"BuildConfig: unknown settings {unknown}")
        missing = [k for k in ("source", "build_dir") if k not in d]
        if missing:
            raise ValueError(f"BuildConfig: missing {missing}")
        stages = {s: _config_from_dict(c, d[s], s) for s, c in STAGE_CONFIGS.items() if s in d}
        return cls(source=d["source"], build_dir=d["build_dir"], **stages)

    def identity(self) -> dict[str, Any]:
        """to_dict() without the runtime-only settings: two configs with the same identity produce the same build."""
        d = self.to_dict()
        # A URL (e.g. webdataset shards over http) is kept verbatim: resolving it as a path would mangle it.
        d["source"] = self.source if is_url(self.source) else str(Path(self.source).resolve())
        d.pop("build_dir")
        for stage, names in RUNTIME_ONLY.items():
            for name in names:
                d[stage].pop(name, None)
        return d

    def save(self, path: str | Path | None = None) -> Path:
        return write_json_atomic(path or self.layout.config, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> BuildConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`stage.setting=value` strings (`cc4m build --set`; the value parsed as JSON when it parses, else kept as a
    string) -> nested overrides for `config_with_overrides`."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or stage not in STAGE_CONFIGS:
            raise ValueError(f"--set {item!r}: expected STAGE.SETTING=VALUE with STAGE in {sorted(STAGE_CONFIGS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(stage, {})[name] = value
    return overrides


def config_with_overrides(source: str, build_dir: str, base: dict[str, Any] | None = None,
                          overrides: dict[str, Any] | None = None) -> BuildConfig:
    """The one way a build's settings are overridden (the CLI's --config/--set and the flow's `config`): a
    BuildConfig from an optional base dict (e.g. a saved config.json; its source and build_dir are not used) with
    `overrides` applied in order: per-stage dicts ({"download": {"timeout": 2}}) or OVERRIDE_SHORTCUTS keys."""
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items() if k in STAGE_CONFIGS}
    for key, value in (overrides or {}).items():
        if key in OVERRIDE_SHORTCUTS:
            stage, name = OVERRIDE_SHORTCUTS[key]
            merged.setdefault(stage, {})[name] = value
        elif key in STAGE_CONFIGS and isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            raise ValueError(f"unknown build config key {key!r}; known: {sorted(STAGE_CONFIGS)} (each a dict of "
                             f"settings) + {sorted(OVERRIDE_SHORTCUTS)}")
    return BuildConfig.from_dict({"source": source, "build_dir": build_dir, **merged})
