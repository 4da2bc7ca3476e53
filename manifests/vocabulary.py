"""The entity vocabulary: the paper's 100 surface words and their synonym map onto 73 classes, as versioned data."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VOCABULARY_DIR = Path(__file__).parent / "vocabulary"
DEFAULT_VOCABULARY = "v1"


@dataclass(frozen=True)
class Vocabulary:
    """Surface words, the classes they map to, and the version string recorded in every output."""

    version: str
    surface_words: tuple[str, ...]
    synonyms: tuple[tuple[str, str], ...]

    @property
    def word_to_class(self) -> dict[str, str]:
        syn = dict(self.synonyms)
        return {word: syn.get(word, word) for word in self.surface_words}

    @property
    def classes(self) -> tuple[str, ...]:
        """Unique canonical classes, in order of first appearance in the surface-word list."""
        seen: dict[str, None] = {}
        for cls in self.word_to_class.values():
            seen.setdefault(cls, None)
        return tuple(seen)

    def class_of(self, word: str) -> str | None:
        """Class of a surface word; matching is case-insensitive ("TV" and "tv" are one word)."""
        lowered = {w.lower(): c for w, c in self.word_to_class.items()}
        return lowered.get(word.lower())


def _validate(raw: dict, path: Path) -> None:
    words = raw.get("surface_words")
    syn = raw.get("synonyms")
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{path}: 'surface_words' must be a list of non-empty strings")
    if len(set(words)) != len(words):
        raise ValueError(f"{path}: duplicate surface words")
    if not isinstance(syn, dict):
        raise ValueError(f"{path}: 'synonyms' must be an object")  # noqa: TRY004 (config errors are ValueErrors)
    unknown = sorted(set(syn) - set(words))
    if unknown:
        raise ValueError(f"{path}: synonyms for words not in the vocabulary: {unknown}")
    targets = set(syn.values())
    bad_targets = sorted(t for t in targets if t not in words or t in syn)
    if bad_targets:
        raise ValueError(f"{path}: synonym targets must be canonical surface words: {bad_targets}")


@cache
def load_vocabulary(name: str = DEFAULT_VOCABULARY) -> Vocabulary:
    """Load a vocabulary by name (a file in manifests/vocabulary/) or by path to a JSON file."""
    path = Path(name)
    if not path.suffix:
        path = VOCABULARY_DIR / f"{name}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    _validate(raw, path)
    return Vocabulary(
        version=raw["version"],
        surface_words=tuple(raw["surface_words"]),
        synonyms=tuple(sorted(raw["synonyms"].items())),
    )
