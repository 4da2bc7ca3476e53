"""Fixtures shared by the curation tests: one spaCy-backed entity extractor per test session (loading is the slow
part, so no test builds its own)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def entity_extractor():
    """The process-wide extractor parse_part also uses (curation.parse.get_extractor): one spaCy load per session."""
    from curation.parse import ParseConfig, get_extractor

    cfg = ParseConfig()
    return get_extractor(cfg.vocabulary, cfg.spacy_model, cfg.batch_size)
