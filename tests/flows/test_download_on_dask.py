"""The flow's download stage task hands its parts to Dask when the build runs with task_runner='dask' (the Dask
runner itself is tested in tests/curation/test_download_dask.py on a LocalCluster)."""
from __future__ import annotations

from contextlib import contextmanager

import curation.source
import flows.tasks
from curation.config import BuildConfig


def test_the_download_stage_task_runs_its_parts_on_dask_only_when_asked(tmp_path, monkeypatch):
    opened, given = [], []

    @contextmanager
    def fake_dask_parts(address, workers):
        opened.append((address, workers))
        yield "the Dask part runner"

    def materialize(self, build_dir, cfg, progress=None, parts=None):
        given.append(parts)
        return {"selected": 0}

    monkeypatch.setattr(flows.tasks, "dask_parts", fake_dask_parts)
    monkeypatch.setattr(curation.source.TableSource, "materialize", materialize)
    source = tmp_path / "src.tsv"
    source.write_text("http://example.com/1.jpg\ta dog\n")
    build = BuildConfig(source=str(source), build_dir=str(tmp_path / "b")).to_dict()
    run = flows.tasks.stage_task.fn
    run("download", build, results={}, dask={"address": "tcp://scheduler:8786", "workers": 3})
    run("download", build, results={})
    assert opened == [("tcp://scheduler:8786", 3)]
    assert given == ["the Dask part runner", None]
