from __future__ import annotations

import json

import pytest

from manifests.vocabulary import VOCABULARY_DIR, load_vocabulary

PAPER_WORDS = (
    "people man men woman women girl boy lady kid child children baby student bride groom couple prince princess "
    "car bus truck motorcycle train bicycle boat aeroplane airplane motorbike bike cup bottle bowl knife spoon glass "
    "fork chair table bench clock laptop light vase plant remote microwave toaster oven mouse keyboard sofa monitor "
    "desk tv TV couch flower refrigerator house building hotel handbag umbrella book backpack phone shirt tie "
    "suitcase T-shirt bag box sink bed toilet cat dog horse bird cow sheep elephant bear zebra giraffe ball racket "
    "skateboard skis snowboard surfboard kite pizza cake apple banana sandwich orange carrot donut"
).split()


def test_v1_has_the_papers_100_words_and_73_classes():
    vocab = load_vocabulary("v1")
    assert vocab.version == "cc4m-vocab-v1"
    assert list(vocab.surface_words) == PAPER_WORDS
    assert len(vocab.surface_words) == 100
    assert len(vocab.classes) == 73
    assert len(set(vocab.classes)) == 73
    assert vocab.classes[0] == "people"


@pytest.mark.parametrize("word,cls", [
    ("man", "people"), ("children", "people"), ("princess", "people"), ("airplane", "aeroplane"),
    ("motorbike", "motorcycle"), ("bike", "bicycle"), ("TV", "tv"), ("tv", "tv"), ("desk", "table"),
    ("couch", "sofa"), ("building", "house"), ("hotel", "house"), ("T-shirt", "shirt"), ("t-shirt", "shirt"),
    ("handbag", "bag"), ("dog", "dog"), ("Dog", "dog"), ("skis", "skis"), ("nonsense", None),
])
def test_synonyms_resolve(word, cls):
    assert load_vocabulary().class_of(word) == cls


def test_every_class_is_a_surface_word_and_every_word_has_a_class():
    vocab = load_vocabulary()
    assert set(vocab.classes) <= set(vocab.surface_words)
    assert set(vocab.word_to_class) == set(vocab.surface_words)
    assert set(vocab.word_to_class.values()) == set(vocab.classes)


def test_bad_vocabulary_files_are_refused(tmp_path):
    good = json.loads((VOCABULARY_DIR / "v1.json").read_text(encoding="utf-8"))
    cases = [
        {**good, "surface_words": good["surface_words"] + ["dog"]},                 # duplicate
        {**good, "synonyms": {**good["synonyms"], "unicorn": "horse"}},             # synonym of unknown word
        {**good, "synonyms": {**good["synonyms"], "cat": "man"}},                   # target is itself a synonym
    ]
    for i, raw in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(raw), encoding="utf-8")
        with pytest.raises(ValueError):
            load_vocabulary(str(path))
