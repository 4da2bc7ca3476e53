from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ingest import DONE_MARKER, REJECT_REASONS, IngestConfig, ingest_source
from manifests.layout import BuildLayout, part_name

# One line per case; expected (reason or None, url, caption). Line i has sample_id i.
LINES: list[tuple[bytes, str | None, str | None, str | None]] = [
    (b"http://a/0.jpg\ta dog on a bench", None, "http://a/0.jpg", "a dog on a bench"),
    (b'http://a/1.jpg\t"quoted" caption keeps its quotes', None, "http://a/1.jpg", '"quoted" caption keeps its quotes'),
    (b"http://a/2.jpg\tcrlf line\r", None, "http://a/2.jpg", "crlf line"),
    (b"http://a/3.jpg\tcaption\twith a tab", None, "http://a/3.jpg", "caption\twith a tab"),
    (b"http://a/4.jpg\tbad \xff\xfe utf8", "bad_utf8", None, None),
    (b"http://a/5.jpg no tab at all", "missing_tab", None, None),
    (b"", "empty_line", None, None),
    (b"   \tcaption without url", "empty_url", None, None),
    (b"http://a/8.jpg\t   ", "empty_caption", None, None),
    (b"http://a/9.jpg\t" + b"x" * 300, "caption_too_long", None, None),
    (b"http://a/" + b"u" * 300 + b"\tcaption", "url_too_long", None, None),
    (b"  http://a/11.jpg  \t  padded caption  ", None, "http://a/11.jpg", "padded caption"),
    (b"http://a/12.jpg\t'single' and \"double\" \"", None, "http://a/12.jpg", "'single' and \"double\" \""),
    (b"http://a/13.jpg\t<PERSON> with caf\xc3\xa9 \xe2\x9c\x93", None, "http://a/13.jpg", "<PERSON> with caf\u00e9 \u2713"),
]
CFG = IngestConfig(rows_per_part=4, max_caption_chars=200, max_url_chars=200, max_line_bytes=1000)


def write_tsv(path, lines=LINES, final_newline=True):
    data = b"\n".join(line for line, *_ in lines) + (b"\n" if final_newline else b"")
    path.write_bytes(data)
    return path


def read_all(build_dir):
    layout = BuildLayout(build_dir)
    ok = pa.concat_tables([pq.read_table(p) for p in layout.parts(layout.ingest_dir)])
    bad = pa.concat_tables([pq.read_table(p) for p in layout.parts(layout.rejects_dir)])
    return ok, bad


def check_against_expectation(build_dir, result):
    ok, bad = read_all(build_dir)
    expected_ok = {i: (url, cap) for i, (_, reason, url, cap) in enumerate(LINES) if reason is None}
    expected_bad = {i: reason for i, (_, reason, _, _) in enumerate(LINES) if reason is not None}
    assert {r["sample_id"]: (r["url"], r["caption"]) for r in ok.to_pylist()} == expected_ok
    assert {r["sample_id"]: r["reason"] for r in bad.to_pylist()} == expected_bad
    assert all(r["line"] == r["sample_id"] + 1 for r in bad.to_pylist())
    assert result["read"] == result["source_rows"] == len(LINES)
    assert result["ingested"] == len(expected_ok)
    assert result["rejected"] == len(expected_bad)
    assert sum(result["rejects_by_reason"].values()) == result["rejected"]
    assert set(result["rejects_by_reason"]) <= set(REJECT_REASONS)


def test_every_row_kind(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    result = ingest_source(str(src), tmp_path / "build", CFG)
    check_against_expectation(tmp_path / "build", result)
    # part k covers ids [4k, 4k+4): 14 rows -> 4 parts, each with an ingest and a rejects file
    assert result["parts"] == [part_name(i) for i in range(4)]
    layout = BuildLayout(tmp_path / "build")
    for k, name in enumerate(result["parts"]):
        ids = pq.read_table(layout.ingest_dir / name).column("sample_id").to_pylist()
        ids += pq.read_table(layout.rejects_dir / name).column("sample_id").to_pylist()
        assert sorted(ids) == list(range(4 * k, min(4 * k + 4, len(LINES))))
    ok, bad = read_all(tmp_path / "build")
    assert ok.schema.field("sample_id").type == pa.int64()
    raw_bad_utf8 = next(r["raw"] for r in bad.to_pylist() if r["reason"] == "bad_utf8")
    assert raw_bad_utf8.startswith("http://a/4.jpg\tbad ") and "\ufffd" in raw_bad_utf8


def test_gzip_and_no_final_newline_same_result(tmp_path):
    plain = write_tsv(tmp_path / "src.tsv", final_newline=False)
    gz = tmp_path / "src.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    result = ingest_source(str(gz), tmp_path / "build", CFG)
    check_against_expectation(tmp_path / "build", result)


def test_parquet_source(tmp_path):
    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"url": ["http://a/0.jpg", None, "http://a/2.jpg", " "],
                             "caption": ['"quoted"', "x", None, "y"], "extra": [1, 2, 3, 4]}), src)
    result = ingest_source(str(src), tmp_path / "build", CFG)
    ok, bad = read_all(tmp_path / "build")
    assert ok.to_pylist() == [{"sample_id": 0, "url": "http://a/0.jpg", "caption": '"quoted"'}]
    assert {r["sample_id"]: r["reason"] for r in bad.to_pylist()} == {1: "empty_url", 2: "empty_caption",
                                                                       3: "empty_url"}
    assert result["read"] == 4 and result["rejected"] == 3


def test_parquet_source_missing_column(tmp_path):
    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"url": ["http://a"]}), src)
    with pytest.raises(ValueError, match="caption"):
        ingest_source(str(src), tmp_path / "build", CFG)


def test_sample_ids_stable_across_part_sizes(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    tables = []
    for size in (1, 3, 100):
        cfg = IngestConfig(rows_per_part=size, max_caption_chars=200, max_url_chars=200, max_line_bytes=1000)
        result = ingest_source(str(src), tmp_path / f"b{size}", cfg)
        assert len(result["parts"]) == -(-len(LINES) // size)
        ok, bad = read_all(tmp_path / f"b{size}")
        tables.append((ok.sort_by("sample_id").to_pylist(), bad.sort_by("sample_id").to_pylist()))
    assert tables[0] == tables[1] == tables[2]


def without_changes(result):
    return {k: v for k, v in result.items() if k != "changes"}


def part_bytes(build_dir):
    layout = BuildLayout(build_dir)
    return {(d.name, p.name): p.read_bytes() for d in (layout.ingest_dir, layout.rejects_dir) for p in layout.parts(d)}


def mtimes(build_dir):
    layout = BuildLayout(build_dir)
    return {(d.name, p.name): p.stat().st_mtime_ns for d in (layout.ingest_dir, layout.rejects_dir)
            for p in layout.parts(d)}


def test_rerun_is_idempotent_and_resumes(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    build = tmp_path / "build"
    first = ingest_source(str(src), build, CFG)
    assert first["changes"]["kind"] == "new"
    layout = BuildLayout(build)
    before = mtimes(build)
    rerun = ingest_source(str(src), build, CFG)
    assert without_changes(rerun) == without_changes(first) and rerun["changes"]["kind"] == "unchanged"
    assert mtimes(build) == before
    # An interrupted run: the marker and one part are gone; the rerun rewrites only what is missing.
    (layout.ingest_dir / DONE_MARKER).unlink()
    (layout.ingest_dir / part_name(2)).unlink()
    again = ingest_source(str(src), build, CFG)
    assert without_changes(again) == without_changes(first)
    assert (layout.ingest_dir / part_name(2)).exists()
    now = mtimes(build)  # the unfinished part is written again (its rejects first), nothing else
    assert {k for k in now if now[k] != before[k]} == {("ingest", part_name(2)), ("rejects", part_name(2))}
    check_against_expectation(build, again)


def test_appended_rows_rewrite_only_the_last_part_and_equal_a_fresh_ingest(tmp_path):
    src = write_tsv(tmp_path / "src.tsv", LINES[:10])  # parts 0, 1 full; part 2 holds rows 8-9
    build = tmp_path / "build"
    ingest_source(str(src), build, CFG)
    (build / "captions").mkdir()
    before = mtimes(build)
    write_tsv(src, LINES)  # rows 10-13 appended: part 2 grows to 4 rows, part 3 is new
    grown = ingest_source(str(src), build, CFG)
    assert grown["changes"] == {"kind": "appended", "rows_before": 10, "rows_added": 4,
                                "parts_rewritten": [part_name(2)], "parts_added": [part_name(3)], "parts_removed": []}
    now = mtimes(build)
    for part in (part_name(0), part_name(1)):  # untouched: the next stages will skip them
        assert now[("ingest", part)] == before[("ingest", part)] and now[("rejects", part)] == before[("rejects", part)]
    fresh = ingest_source(str(src), tmp_path / "fresh", CFG)
    assert without_changes(fresh) == without_changes(grown)
    assert part_bytes(build) == part_bytes(tmp_path / "fresh")
    check_against_expectation(build, grown)


def test_an_edited_row_rewrites_its_part_only(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    build = tmp_path / "build"
    ingest_source(str(src), build, CFG)
    before = mtimes(build)
    edited = list(LINES)
    edited[5] = (b"http://a/5.jpg\tnow a valid row", None, "http://a/5.jpg", "now a valid row")
    write_tsv(src, edited)
    result = ingest_source(str(src), build, CFG)
    assert result["changes"]["kind"] == "changed"
    assert result["changes"]["parts_rewritten"] == [part_name(1)] and result["rejected"] == 6
    now = mtimes(build)
    changed = {k for k in now if now[k] != before[k]}
    assert changed == {("ingest", part_name(1)), ("rejects", part_name(1))}
    ingest_source(str(src), tmp_path / "fresh", CFG)
    assert part_bytes(build) == part_bytes(tmp_path / "fresh")


def test_a_shrunk_source_removes_its_parts_and_what_was_made_of_them(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    build = tmp_path / "build"
    ingest_source(str(src), build, CFG)
    layout = BuildLayout(build)
    for directory in (layout.captions_dir, layout.selected_dir):  # stand-ins for the next stages' outputs
        directory.mkdir()
        for i in range(4):
            (directory / part_name(i)).write_bytes(b"x")
    write_tsv(src, LINES[:6])
    result = ingest_source(str(src), build, CFG)
    assert result["parts"] == [part_name(0), part_name(1)]
    assert result["changes"]["kind"] == "changed"
    assert result["changes"]["parts_removed"] == [part_name(2), part_name(3)]
    for directory in (layout.ingest_dir, layout.rejects_dir, layout.captions_dir, layout.selected_dir):
        assert [p.name for p in layout.parts(directory)] == [part_name(0), part_name(1)], directory


def test_changed_content_settings_rewrite_the_parts_but_progress_does_not(tmp_path):
    src = write_tsv(tmp_path / "src.tsv")
    build = tmp_path / "build"
    first = ingest_source(str(src), build, CFG)
    before = mtimes(build)
    again = ingest_source(str(src), build, IngestConfig(**{**CFG.to_dict(), "progress": False}))
    assert again["changes"]["kind"] == "unchanged" and mtimes(build) == before
    wider = ingest_source(str(src), build, IngestConfig(**{**CFG.to_dict(), "max_caption_chars": 400}))
    assert wider["changes"]["kind"] == "changed"
    assert wider["rejected"] == first["rejected"] - 1  # row 9's 300-character caption now fits
    assert all(before[k] != v for k, v in mtimes(build).items())


def test_line_longer_than_limit_is_rejected_without_loading(tmp_path):
    src = tmp_path / "src.tsv"
    src.write_bytes(b"http://a/0.jpg\tok\n" + b"http://a/1.jpg\t" + b"z" * 5000 + b"\nhttp://a/2.jpg\tafter\n")
    result = ingest_source(str(src), tmp_path / "build", CFG)
    ok, bad = read_all(tmp_path / "build")
    assert [r["sample_id"] for r in ok.to_pylist()] == [0, 2]
    assert [(r["sample_id"], r["reason"]) for r in bad.to_pylist()] == [(1, "line_too_long")]
    assert len(bad.column("raw")[0].as_py()) <= CFG.raw_chars_kept
    assert result["rejects_by_reason"] == {"line_too_long": 1}


def test_empty_source_gives_one_empty_part(tmp_path):
    src = tmp_path / "empty.tsv"
    src.write_bytes(b"")
    result = ingest_source(str(src), tmp_path / "build", CFG)
    assert result["read"] == 0 and result["parts"] == [part_name(0)]
    assert pq.read_table(tmp_path / "build" / "ingest" / part_name(0)).num_rows == 0


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        ingest_source(str(tmp_path / "nope.tsv"), tmp_path / "build", CFG)


@pytest.mark.parametrize("bad", [{"rows_per_part": 0}, {"max_caption_chars": -1}, {"rows_per_part": 1.5},
                                 {"max_line_bytes": 10}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        IngestConfig(**bad)


def test_real_captions(tmp_path, cc3m_captions_tsv):
    result = ingest_source(str(cc3m_captions_tsv), tmp_path / "build", IngestConfig(rows_per_part=4000))
    assert result["read"] == 10_000 and result["rejected"] == 0 and len(result["parts"]) == 3
    ok, _ = read_all(tmp_path / "build")
    assert ok.column("sample_id").to_pylist() == list(range(10_000))


URL_CASES: list[tuple[bytes, str | None, str | None]] = [
    (b"\xef\xbb\xbfhttp://a/0.jpg\tfirst row with a byte-order mark", None, "http://a/0.jpg"),
    (b"www.example.com/a.jpg\tno scheme", "no_scheme", None),
    (b"//example.com/a.jpg\tscheme-relative", "no_scheme", None),
    (b"http://a/3\x00.jpg\tNUL", "control_characters", None),
    (b"http://a/4\r.jpg\tlone CR", "control_characters", None),
    (b"http://a/5.jpg\r\tCR at the end of the url", "control_characters", None),
    ("http://a/6\u2028.jpg\tline separator".encode(), "control_characters", None),
    ("http://a/7\u0085.jpg\tNEL".encode(), "control_characters", None),
    (b"http://a/8\x1b.jpg\tescape", "control_characters", None),
    ("http://a/caf\u00e9 9.jpg\tnon-ASCII and a space: kept, the fetcher encodes them".encode(), None,
     "http://a/caf\u00e9 9.jpg"),
    (b"file:///etc/passwd\ta scheme: the download stage refuses it", None, "file:///etc/passwd"),
    (b"\xef\xbb\xbfhttp://a/11.jpg\ta BOM after the first row is not stripped", "no_scheme", None),
]


def test_urls_that_cannot_be_web_addresses(tmp_path):
    src = tmp_path / "src.tsv"
    src.write_bytes(b"\n".join(line for line, *_ in URL_CASES) + b"\n")
    result = ingest_source(str(src), tmp_path / "build", CFG)
    ok, bad = read_all(tmp_path / "build")
    assert {r["sample_id"]: r["url"] for r in ok.to_pylist()} == {
        i: url for i, (_, reason, url) in enumerate(URL_CASES) if reason is None}
    assert {r["sample_id"]: r["reason"] for r in bad.to_pylist()} == {
        i: reason for i, (_, reason, _) in enumerate(URL_CASES) if reason is not None}
    assert result["rejects_by_reason"] == {"control_characters": 6, "no_scheme": 3}
