"""Shared contracts between curation and training: the entity vocabulary, the build layout and the manifest schema.

Both `curation` and `ovseg_core` may import this package; it imports neither of them, nor Prefect.
"""
from manifests.version import code_version
from manifests.vocabulary import Vocabulary, load_vocabulary

__all__ = ["Vocabulary", "code_version", "load_vocabulary"]
