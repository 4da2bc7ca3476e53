"""Moved to `manifests.layout` (the contract package). This name stays only for code written against the old
place while parallel branches merge; new code imports `manifests.layout`."""
from manifests.layout import PART_PATTERN, SHARD_PATTERN, BuildLayout, part_name, shard_for_rank, shard_name

__all__ = ["PART_PATTERN", "SHARD_PATTERN", "BuildLayout", "part_name", "shard_for_rank", "shard_name"]
