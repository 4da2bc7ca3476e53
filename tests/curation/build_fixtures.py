"""Test helpers shared by the select/download/reshard/manifest/build tests: tiny images, a local image server that
also answers as an HTTP proxy, and caption/selected parts written straight to the column contract."""
from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ENTITY_WORD = pa.struct([("word", pa.string()), ("class", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
CAPTIONS_SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("entities", pa.list_(pa.string())),
    ("entity_words", pa.list_(ENTITY_WORD)),
])


def make_jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for x in range(0, size[0], 4):  # some structure so different seeds never collide
        img.putpixel((x, (seed + x) % size[1]), (255 - x % 256, seed % 256, 7))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ImageServer:
    """Serves {path: (status, body, content_type)} on 127.0.0.1:<free port>; also accepts proxy-style absolute URLs
    (`GET http://host/path`), so `proxy_url` works as an `http_proxy` for fake hosts."""

    def __init__(self, routes: dict[str, tuple[int, bytes, str]], delay_s: float = 0.0):
        self.routes = routes
        routes_ref = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if delay_s:
                    time.sleep(delay_s)  # a slow web: downloads take long enough to be interrupted
                path = urlsplit(self.path).path if self.path.startswith("http") else self.path
                status, body, ctype = routes_ref.get(path, (404, b"not found", "text/plain"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def caption_rows(ids, base_url: str, classes=("dog", "car", "cat"), empty_every: int = 0) -> list[dict]:
    """Rows of the captions contract; every `empty_every`-th row names no class."""
    rows = []
    for i, sid in enumerate(ids):
        if empty_every and i % empty_every == 0:
            rows.append({"sample_id": sid, "url": f"{base_url}/img/{sid}.jpg", "caption": f"a view number {sid}",
                         "entities": [], "entity_words": []})
            continue
        a, b = classes[i % len(classes)], classes[(i + 1) % len(classes)]
        caption = f"a {a} and a {b} number {sid}"
        words = [{"word": a, "class": a, "start": 2, "end": 2 + len(a)},
                 {"word": b, "class": b, "start": 9 + len(a), "end": 9 + len(a) + len(b)}]
        assert all(caption[w["start"]:w["end"]] == w["word"] for w in words)
        rows.append({"sample_id": sid, "url": f"{base_url}/img/{sid}.jpg", "caption": caption,
                     "entities": sorted({a, b}), "entity_words": words})
    return rows


def write_part(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA).replace_schema_metadata(
        {b"cc4m.vocabulary": b"cc4m-vocab-v1", b"cc4m.spacy_model": b"test-model 0.0"})
    pq.write_table(table, path)
    return path


def write_staged_build(root: Path, n: int = 26, per_staging_shard: int = 10, fail_idx=(2,), dup_idx=(5,),
                       partners_k: int = 2, empty_every: int = 8, n_rejects: int = 2) -> dict:
    """A build folder as the stages before reshard leave it, written directly to the column contracts: ingest,
    rejects and captions parts (every `empty_every`-th caption names no class), selected part (by the real select
    stage), a shuffled staging tar per `per_staging_shard` selected rows, downloads.parquet, duplicates.parquet,
    kept.parquet (selected minus failures/duplicates, by position in the selected list), entity index, partners."""
    import hashlib
    import random
    import tarfile

    from curation.select import SelectConfig, select_part
    from curation.staging import DOWNLOADS_SCHEMA
    from manifests.layout import BuildLayout, part_name

    layout = BuildLayout(root)
    ids = [2 * i + 1 for i in range(n)]  # sparse ids: the even ones are the rejected rows
    rows = caption_rows(ids, "http://cc4m-sample.invalid", empty_every=empty_every)
    by_id = {r["sample_id"]: r for r in rows}
    part = part_name(0)
    write_part(layout.captions_dir / part, rows)
    layout.ingest_dir.mkdir(parents=True, exist_ok=True)
    layout.rejects_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "url", "caption")} for r in rows]),
                   layout.ingest_dir / part)
    reject_schema = pa.schema([("sample_id", pa.int64()), ("line", pa.int64()), ("raw", pa.string()),
                               ("reason", pa.string())])
    rejects = [{"sample_id": 2 * i, "line": 2 * i + 1, "raw": "no tab", "reason": "missing_tab"}
               for i in range(n_rejects)]
    pq.write_table(pa.Table.from_pylist(rejects, schema=reject_schema), layout.rejects_dir / part)
    # What ingest records when it has read the whole source (the manifest takes `read` from here).
    (layout.ingest_dir / "ingest-done.json").write_text(json.dumps({"result": {"source_rows": n + n_rejects}}))
    select_result = select_part(root, part, SelectConfig())
    selected = pq.read_table(layout.selected_dir / part)["sample_id"].to_pylist()
    fail_ids = {selected[i] for i in fail_idx}
    dup_ids = {selected[i] for i in dup_idx}

    layout.staging_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    downloads, images = [], {}
    for s in range(0, len(selected), per_staging_shard):
        shard = f"{s // per_staging_shard:05d}"
        members = []
        for pos, sid in enumerate(selected[s:s + per_staging_shard]):
            key = f"{s // per_staging_shard:05d}{pos:04d}"
            if sid in fail_ids:
                downloads.append({"sample_id": sid, "url": "u", "status": "failed_to_download", "reason": "http_404",
                                  "transient": False, "error_message": "http_404: HTTP Error 404: Not Found",
                                  "width": None, "height": None, "sha256": None, "staging_shard": shard,
                                  "staging_key": key})
                continue
            jpg = make_jpeg(sid)
            images[sid] = jpg
            members.append((key, jpg))
            downloads.append({"sample_id": sid, "url": "u", "status": "success", "error_message": None, "width": 40,
                              "height": 30, "sha256": hashlib.sha256(jpg).hexdigest(), "staging_shard": shard,
                              "staging_key": key})
        rng.shuffle(members)  # img2dataset writes in completion order
        with tarfile.open(layout.staging_dir / f"{shard}.tar", "w") as tar:
            for key, jpg in members:
                for ext, data in (("jpg", jpg), ("txt", b"caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(downloads, schema=DOWNLOADS_SCHEMA), layout.downloads)
    kept = [sid for sid in selected if sid not in fail_ids and sid not in dup_ids]
    pq.write_table(pa.table({"sample_id": pa.array(kept, pa.int64()),
                             "entities": [by_id[s]["entities"] for s in kept],
                             "sha256": [hashlib.sha256(images[s]).hexdigest() for s in kept]}), layout.kept)
    pq.write_table(pa.Table.from_pylist(
        [{"sample_id": d, "duplicate_of": kept[0], "kind": "exact", "distance": 0} for d in sorted(dup_ids)],
        schema=pa.schema([("sample_id", pa.int64()), ("duplicate_of", pa.int64()), ("kind", pa.string()),
                          ("distance", pa.int32())])), layout.duplicates)
    partner_rows = []
    for i, sid in enumerate(kept):
        for rank in range(partners_k if i % 5 else 0):  # every 5th sample has no partner
            pid = kept[(i + rank + 1) % len(kept)]
            partner_rows.append({"sample_id": sid, "rank": rank, "partner_id": pid,
                                 "shared_class": by_id[sid]["entities"][0]})
    layout.index_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(partner_rows, schema=pa.schema([
        ("sample_id", pa.int64()), ("rank", pa.int32()), ("partner_id", pa.int64()), ("shared_class", pa.string())])),
        layout.partners)
    classes = sorted({c for s in kept for c in by_id[s]["entities"]})
    pq.write_table(pa.table({"class": classes,
                             "sample_ids": [[s for s in kept if c in by_id[s]["entities"]] for c in classes]}),
                   layout.entity_index)
    return {"ids": ids, "selected": selected, "kept": kept, "images": images, "rows": by_id,
            "partners": partner_rows, "select": select_result, "fail_ids": fail_ids, "dup_ids": dup_ids,
            "n_rejects": n_rejects}
