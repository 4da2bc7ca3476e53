from __future__ import annotations

from collections import Counter
from pathlib import Path

from curation.sample import BUNDLED_CAPTIONS, SAMPLE_HOST, build_caption_file, read_caption_rows
from curation.sample.make import FAIL_KINDS, parse_sample_url


def test_bundled_captions_layout_and_failure_fraction() -> None:
    data = BUNDLED_CAPTIONS.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) == 4000
    assert not lines[0].lower().startswith("url\t")  # no header: CC12M layout

    rows = read_caption_rows(BUNDLED_CAPTIONS)
    kinds = Counter(r.kind for r in rows)
    assert kinds["missing_tab"] == 2 and kinds["empty_caption"] == 2
    failing = sum(kinds[k] for k in FAIL_KINDS)
    assert all(kinds[k] >= 10 for k in FAIL_KINDS)
    assert 0.03 <= failing / len(rows) <= 0.05
    for row in rows:
        if row.url is None:
            continue
        assert row.url.startswith(f"http://{SAMPLE_HOST}/")
        _kind, number = parse_sample_url(row.url)
        assert number == row.sample_id  # the URL names its own row: images/<sample_id>.jpg


def test_special_ingest_rows_are_where_documented() -> None:
    lines = BUNDLED_CAPTIONS.read_text(encoding="utf-8").split("\n")
    assert lines[23].endswith("\t") and lines[23].count("\t") == 1 and lines[2500].endswith("\t")
    assert "\t" not in lines[41] and "\t" not in lines[3500]
    quoted = [i for i, line in enumerate(lines) if "\t" in line and line.split("\t", 1)[1].startswith('"')]
    assert len(quoted) == 2 and quoted[0] >= 7 and quoted[1] >= 1500
    captions = {r.sample_id: r.caption for r in read_caption_rows(BUNDLED_CAPTIONS)}
    for i in quoted:  # kept verbatim, quote included, by a reader that does not do CSV quoting
        assert captions[i] == lines[i].split("\t", 1)[1]
    assert captions[quoted[1]].count('"') == 1  # the unbalanced one


def test_a_third_of_captions_name_a_vocabulary_class(lexical_extractor) -> None:
    rows = [r for r in read_caption_rows(BUNDLED_CAPTIONS) if r.caption]
    with_class = sum(1 for c in lexical_extractor.classes_of([r.caption for r in rows]) if c)
    assert 0.28 <= with_class / len(rows) <= 0.45


def test_small_prefix_exercises_every_failure_kind() -> None:
    rows = read_caption_rows(BUNDLED_CAPTIONS, n_rows=60)
    kinds = {r.kind for r in rows}
    assert set(FAIL_KINDS) <= kinds and {"missing_tab", "empty_caption", "image"} <= kinds


def test_generator_reproduces_the_bundled_file(cc3m_captions_tsv: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.tsv"
    result = build_caption_file(cc3m_captions_tsv, out, n_rows=4000)
    assert out.read_bytes() == BUNDLED_CAPTIONS.read_bytes()
    assert result["rows"] == 4000
