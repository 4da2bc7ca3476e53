"""`cc4m build` turns a user error into one line on stderr (what went wrong, naming the file or folder, and what to
do) and exit code 2; a bug still raises with its traceback. Every bad input is made here, in tmp_path."""
from __future__ import annotations

import errno
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.build
import curation.io
import curation.source
from curation.config import BuildConfig
from curation.lock import BuildLock
from flows.cli import main

ROWS = "".join(f"http://example.com/{i}.jpg\ta dog and a cat on a couch, photo {i}\n" for i in range(2000))


class StopBuild(Exception):
    """Raised by a patched first stage: the build got past its checks and started."""


def _tsv(tmp_path, name="src.tsv"):
    path = tmp_path / name
    path.write_text(ROWS, encoding="utf-8")
    return path


def _one_error_line(capsys, source, out, *extra) -> str:
    code = main(["build", "--source", str(source), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cc4m build: ")
    return lines[0]


# The first thing a build runs: the ingest of a table source (curation.source), then parsing (curation.stages).
INGEST, PARSE = "curation.source.TableSource.ingest", "curation.stages.parse_part"


def _build_until(monkeypatch, target: str, source, out) -> None:
    """Run `cc4m build` and stop it when it calls `target` (a dotted name): it got past its checks."""
    def stop(*args, **kwargs):
        raise StopBuild

    monkeypatch.setattr(target, stop)
    with pytest.raises(StopBuild):
        main(["build", "--source", str(source), "--out", str(out)])


def test_truncated_tsv_gz_is_one_line(tmp_path, capsys):
    source = tmp_path / "src.tsv.gz"
    data = gzip.compress(ROWS.encode())
    source.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    line = _one_error_line(capsys, source, out)
    assert str(source) in line and "truncated" in line and "complete copy" in line and "--out" in line


def test_replaced_source_in_a_started_build_folder_just_builds(tmp_path, capsys, monkeypatch):
    """The rerun after a truncated .tsv.gz was replaced by a complete copy, into the same folder: ingest is
    content-addressed, so the parts read before the truncation are checked and kept, and the build goes on."""
    source, out = tmp_path / "src.tsv.gz", tmp_path / "out"
    data = gzip.compress(ROWS.encode())
    source.write_bytes(data[: len(data) // 2])
    _one_error_line(capsys, source, out)
    source.write_bytes(data)
    _build_until(monkeypatch, PARSE, source, out)
    done = json.loads((out / "ingest" / "ingest-done.json").read_text())
    assert done["result"]["read"] == len(ROWS.splitlines())


def test_parquet_with_wrong_columns_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "src.parquet"
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), source)
    line = _one_error_line(capsys, source, tmp_path / "out")
    assert str(source) in line and "lacks column(s) ['caption', 'url']" in line and "Give it 'url' and 'caption'" in line
    assert not (tmp_path / "out").exists()


def test_file_named_parquet_that_is_not_parquet_is_one_line(tmp_path, capsys):
    source = tmp_path / "src.parquet"
    source.write_text(ROWS, encoding="utf-8")
    line = _one_error_line(capsys, source, tmp_path / "out")
    assert str(source) in line and "is not a readable parquet file" in line and ".tsv" in line


def _fail_mid_write(monkeypatch, code):
    """pyarrow's writer (under curation.io's atomic parquet write) dies half-way: half the bytes are in the
    temporary, then the OS error, as a real write() raises it (ENOSPC carries no file name, EACCES/EROFS do)."""
    real_write = curation.io.pq.write_table

    def half_write(table, where, **kwargs):
        real_write(table, where, **kwargs)
        os.truncate(where, os.path.getsize(where) // 2)
        if code == errno.ENOSPC:
            raise OSError(code, os.strerror(code))
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr(curation.io.pq, "write_table", half_write)


@pytest.mark.parametrize(("code", "said", "todo"), [
    (errno.ENOSPC, "no space left on the device holding", "Free some space"),
    (errno.EACCES, "permission denied writing", "Make the build folder writable"),
    (errno.EROFS, "read-only file system", "writable disk"),
])
def test_os_error_mid_write_is_one_line(tmp_path, capsys, monkeypatch, code, said, todo):
    _fail_mid_write(monkeypatch, code)
    out = tmp_path / "out"
    line = _one_error_line(capsys, _tsv(tmp_path), out)
    assert said in line and todo in line and str(out) in line


def test_read_only_build_folder_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod cannot make a folder read-only for us "
                    "(the mid-write PermissionError case covers this path)")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        line = _one_error_line(capsys, _tsv(tmp_path), out)
    finally:
        out.chmod(0o755)
    assert "permission denied writing" in line and str(out) in line


def test_unreadable_source_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    source = _tsv(tmp_path)

    def no_read(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(curation.source, "open", no_read, raising=False)  # only the source check's open()
    line = _one_error_line(capsys, source, tmp_path / "out")
    assert f"cannot read source {source}" in line and "Make it readable" in line
    assert not (tmp_path / "out").exists()


def test_mistyped_source_leaves_no_config_and_the_corrected_rerun_starts(tmp_path, capsys, monkeypatch):
    source, out = _tsv(tmp_path), tmp_path / "out"
    line = _one_error_line(capsys, tmp_path / "scr.tsv", out)
    assert str(tmp_path / "scr.tsv") in line and "does not exist" in line and "Check the path" in line
    assert not (out / "config.json").exists()
    _build_until(monkeypatch, INGEST, source, out)
    assert json.loads((out / "config.json").read_text())["source"] == str(source)


def test_folder_left_with_only_config_and_lock_takes_a_new_config(tmp_path, monkeypatch):
    """What an older cc4m left after a mistyped source: config.json (another source) + the lock, no output."""
    source, out = _tsv(tmp_path), tmp_path / "out"
    BuildConfig(source=str(tmp_path / "scr.tsv"), build_dir=str(out)).save()
    with BuildLock(out):
        pass
    _build_until(monkeypatch, INGEST, source, out)
    assert json.loads((out / "config.json").read_text())["source"] == str(source)


def test_config_mismatch_names_the_cli_flag(tmp_path, capsys):
    source, out = _tsv(tmp_path), tmp_path / "out"
    curation.build.prepare_build_dir(BuildConfig(source=str(_tsv(tmp_path, "old.tsv")), build_dir=str(out)))
    (out / "ingest").mkdir()  # a stage's output: now two configs would be mixed
    line = _one_error_line(capsys, source, out)
    assert f"{out} was built with a different config (changed: source)" in line
    assert "--allow-config-change" in line and "allow_config_change=True" not in line and "--out" in line
    with pytest.raises(curation.build.BuildConfigMismatch, match="allow_config_change=True"):  # the API's words
        curation.build.prepare_build_dir(BuildConfig(source=str(source), build_dir=str(out)))


def test_busy_build_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    with BuildLock(out):
        line = _one_error_line(capsys, _tsv(tmp_path), out)
    assert f"build folder {out} is in use by another build" in line and "Wait for it to finish" in line


@pytest.mark.parametrize("bug", [KeyError("x"), ValueError("a bug"), EOFError("not a gzip source")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    def broken_stage(*args, **kwargs):
        raise bug

    monkeypatch.setattr(INGEST, broken_stage)
    with pytest.raises(type(bug)):
        main(["build", "--source", str(_tsv(tmp_path)), "--out", str(tmp_path / "out")])


def test_a_build_where_nothing_downloads_is_refused_in_one_line(tmp_path, capsys):
    """Every row is blocked_address (loopback, no network opened) and min_success_rate=0 lets any rate through:
    the build is refused at verify in one line, never a raw error from reshard, and writes no shards."""
    source = tmp_path / "loopback.tsv"
    source.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\ta dog and a cat on a couch, photo {i}\n"
                              for i in range(12)), encoding="utf-8")
    out = tmp_path / "out"
    line = _one_error_line(capsys, source, out, "--set", "verify.min_success_rate=0")
    assert line == ("cc4m build: verify: no image was downloaded (12 selected samples; failures: "
                    "{'blocked_address': 12}), so there is nothing to build. Check the URL list and the network/proxy "
                    "(blocked_address: an internal mirror needs download.allowed_networks)")
    assert not (out / "shards").exists() and not (out / "manifest.json").exists()
