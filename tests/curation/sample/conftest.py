"""Fixtures for the embedded-sample tests: a fast lexical class extractor and a small rendered sample."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from curation.sample import SampleInfo, make_sample
from manifests.vocabulary import load_vocabulary


class LexicalExtractor:
    """Stand-in for curation.entities.EntityExtractor: vocabulary words with a plural 's'/'es' stripped, no spaCy."""

    version = "test-lexical"

    def __init__(self) -> None:
        self.words = {w.lower(): c for w, c in load_vocabulary().word_to_class.items()}

    def classes_of(self, captions: Sequence[str]) -> list[list[str]]:
        out = []
        for caption in captions:
            found = set()
            for token in re.findall(r"[A-Za-z-]+", caption.lower()):
                for form in (token, token.removesuffix("s"), token.removesuffix("es")):
                    if form in self.words:
                        found.add(self.words[form])
            out.append(sorted(found))
        return out


@pytest.fixture(scope="session")
def lexical_extractor() -> LexicalExtractor:
    return LexicalExtractor()


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory: pytest.TempPathFactory, lexical_extractor: LexicalExtractor) -> SampleInfo:
    """The first 60 rows rendered at 64 px (every failure kind and every ingest-special kind but the late ones)."""
    out = tmp_path_factory.mktemp("sample") / "sample"
    return make_sample(
        out, n_rows=60, image_size=64, extractor=lexical_extractor, eval_images=20, eval_selection_images=5
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]
