"""The embedded sample: real captions + rendered images served offline, so the whole DAG runs on a laptop.

Bundled data: `data/captions.tsv` = the first 4000 rows of CC3M val (shared/data/cc3m_val_10k.tsv) in CC12M layout,
`url<TAB>caption`, no header, UTF-8, "\\n" line ends (about 36 % of the captions name a vocabulary class). It was
written by `make.build_caption_file(src, out, 4000)`; regenerate with

    python -c "from curation.sample.make import build_caption_file as b; b('../shared/data/cc3m_val_10k.tsv', \\
               'curation/sample/data/captions.tsv', 4000)"

URLs use the reserved, never-resolvable host `cc4m-sample.invalid`, so the file (and its sha256) does not depend on
where the server runs; `server.SampleImageServer` answers them as an HTTP proxy (`http_proxy=<its proxy_url>`).
Row r (0-based line number = sample_id) has one of these URLs:

    /images/<r>.jpg          the rendered image of row r                     (~96 %)
    /fail/404/<r>.jpg        HTTP 404                                        (hash-chosen rows, 4 % in all:
    /fail/500/<r>.jpg        HTTP 500                                         404 1.2 %, 500 0.8 %, slow 0.5 %,
    /fail/slow/<r>.jpg       the image after `slow_seconds` (server setting,  corrupt 0.7 %, notimage 0.8 %)
                             default 6 s): longer than the download timeout
    /fail/corrupt/<r>.jpg    200 image/jpeg, the JPEG truncated to half: decoding fails
    /fail/notimage/<r>.jpg   200 text/html page

The first five rows (from row 2) whose caption names a vocabulary word get one failure kind each (404, 500, slow,
corrupt, notimage: rows 5, 6, 10, 14, 15) so that a small `n_rows` sample exercises every failure too.
In the 4000 rows: image 3830 (incl. the 6 special rows below), 404 52, 500 25, slow 21, corrupt 30, notimage 42.

Rows that are special for INGEST (make.INGEST_ROWS; all six have /images/ URLs):

    row 23, 2500   empty caption: "url<TAB>" (ingest: empty_caption reject)
    row 41, 3500   missing tab: "url caption" with a space (ingest: missing_tab reject)
    row 7          caption starts with a quoted word: `"young" woman seated on the beach` — must be KEPT as is
    row 1507       caption starts with an unbalanced `"` — must be KEPT as is (a CSV reader with quoting would
                   swallow the following lines). (Quote rows = first row >= 7 / >= 1500 naming a vocabulary word.)

Modules: `render` (images + masks per class list), `server` (HTTP proxy/server), `make` (sample folder, eval set),
`cli` (`cc4m sample`), `img2dataset_check` (downloads a sample with img2dataset through the server).
"""

from __future__ import annotations

from curation.sample.make import (
    BUNDLED_CAPTIONS,
    SAMPLE_HOST,
    EvalSetInfo,
    SampleInfo,
    build_caption_file,
    make_eval_set,
    make_sample,
    read_caption_rows,
)
from curation.sample.render import class_palette, render_sample
from curation.sample.server import SampleImageServer

__all__ = [
    "BUNDLED_CAPTIONS",
    "SAMPLE_HOST",
    "EvalSetInfo",
    "SampleImageServer",
    "SampleInfo",
    "build_caption_file",
    "class_palette",
    "make_eval_set",
    "make_sample",
    "read_caption_rows",
    "render_sample",
]
