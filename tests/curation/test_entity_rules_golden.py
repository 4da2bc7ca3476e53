"""The lexical entity rules (curation.entities: the word-rule table) pinned on real captions: every candidate's
decision (accept / reject / need_tag) on the 10,000 CC3M captions of ../shared/data, each in five casings (as given,
Sentence case, Title Case, every other word capitalised, UPPER) so the name rules are exercised too.

The digest was recorded with the if-chain the table replaced, so the table decides exactly as it did. A deliberate
rule change changes it: check the changed decisions (`decision_lines` lists them) and record the new digest."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from curation.entities import EntityExtractor, _base_of, _Candidate, _Context

DIGEST = "258d39ead4951ed0fc0e13b5e9564ccfaab39bea30bfb0537fed46d3b5eccd73"
COUNTS = {"accept": 18001, "need_tag": 3079, "reject": 650}


def casings(caption: str) -> list[str]:
    words = caption.split(" ")
    every_other = " ".join(w.capitalize() if k % 2 else w for k, w in enumerate(words))
    return [caption, caption.capitalize(), caption.title(), every_other, caption.upper()]


def decision_lines(captions: list[str]) -> list[str]:
    """`caption:casing:offset:decision` for every candidate, in caption order."""
    extractor = EntityExtractor(use_tagger=False)
    lines = []
    for n, caption in enumerate(captions):
        for v, text in enumerate(casings(caption)):
            ctx = _Context(text)
            for match in extractor._regex.finditer(text):
                form = match.group().lower()
                surface = extractor._forms[form]
                candidate = _Candidate(match.start(), match.end(), surface, form, _base_of(form, surface))
                lines.append(f"{n}:{v}:{match.start()}:{extractor._lexical_decision(candidate, ctx)}")
    return lines


def test_word_rules_decide_the_cc3m_captions_as_recorded(cc3m_captions_tsv: Path):
    rows = cc3m_captions_tsv.read_text(encoding="utf-8").splitlines()
    lines = decision_lines([row.split("\t", 1)[1] for row in rows])
    assert Counter(line.rsplit(":", 1)[1] for line in lines) == COUNTS
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == DIGEST
