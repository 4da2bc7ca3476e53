"""Shared contracts between curation and training: the entity vocabulary, the build layout and the manifest schema.

Both `curation` and `ovseg_core` may import this package; it imports neither of them, nor Prefect.
"""
from manifests.vocabulary import Vocabulary, load_vocabulary
from manifests.version import code_version

__all__ = ["Vocabulary", "load_vocabulary", "code_version"]
