"""The embedded sample as a webdataset source: what an img2dataset crawl of the sample's TSV would have left.

    <out>/{00000..0000N}.tar     <9-digit key>.jpg / .txt / .json, key = the sample row (= the TSV route's sample_id)

Row by row, from the rendered sample (the image bytes are the very ones its server answers):
- a normal image row: jpg + txt + json (url, caption, key, status);
- a `corrupt` row: the JPEG truncated to half, as the server sends it (the build fails it as undecodable);
- an `empty_caption` row: its image and an empty txt (ingest rejects it);
- 404 / 500 / slow / notimage rows and rows without a tab: absent, as from a real crawl, except the first 404 row,
  kept with txt + json and no image (ingest rejects it as `no_image`).
So the selected and kept ids of a build from these shards equal the TSV route's on the rows both have images for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from curation.io import read_json, write_json_atomic
from curation.sample.make import SampleInfo, read_caption_rows
from curation.tario import write_tar

WDS_VERSION = 1
MARKER = "wds.json"


@dataclass(frozen=True)
class WdsSampleInfo:
    root: Path
    pattern: str  # brace pattern naming every shard, e.g. <root>/{00000..00003}.tar
    shards: tuple[Path, ...]
    ids_with_image: frozenset[int]  # rows whose (possibly corrupt) image is in the shards
    no_image_ids: frozenset[int]    # rows with a caption and no image


def _members(row, image: bytes | None) -> list[tuple[str, bytes]]:
    key = f"{row.sample_id:09d}"
    meta = {"url": row.url, "caption": row.caption, "key": key, "status": "success"}
    members = [] if image is None else [(f"{key}.jpg", image)]
    return members + [(f"{key}.txt", (row.caption or "").encode("utf-8")),
                      (f"{key}.json", json.dumps(meta).encode("utf-8"))]


def make_wds_source(info: SampleInfo, out_dir: str | Path, n_shards: int = 4) -> WdsSampleInfo:
    """Write the sample as `n_shards` webdataset shards into out_dir (reused when already made from this sample)."""
    out = Path(out_dir)
    rows = read_caption_rows(info.source_tsv)
    per_shard = -(-len(rows) // n_shards)
    names = [f"{i:05d}.tar" for i in range(n_shards)]
    first_404 = next((r.sample_id for r in rows if r.kind == "404"), None)
    with_image = {r.sample_id for r in rows if r.kind in ("image", "corrupt", "empty_caption")}
    no_image = {first_404} if first_404 is not None else set()
    result = WdsSampleInfo(out, f"{out}/{{00000..{n_shards - 1:05d}}}.tar", tuple(out / n for n in names),
                           frozenset(with_image), frozenset(no_image))
    params = {"version": WDS_VERSION, "n_shards": n_shards, "sample": str(Path(info.root).resolve()),
              "n_rows": len(rows)}
    marker = out / MARKER
    if marker.exists() and read_json(marker) == params and all(p.exists() for p in result.shards):
        return result
    out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        with write_tar(out / name) as tar:
            for row in rows[index * per_shard:(index + 1) * per_shard]:
                if row.sample_id not in with_image | no_image:
                    continue
                image = None
                if row.sample_id in with_image:
                    image = (Path(info.images_dir) / f"{row.sample_id}.jpg").read_bytes()
                    if row.kind == "corrupt":
                        image = image[: len(image) // 2]  # what the sample server sends for /fail/corrupt/
                for member, data in _members(row, image):
                    tar.add(member, data)
    write_json_atomic(marker, params)
    return result
