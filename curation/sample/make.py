"""Build the embedded sample: the bundled caption TSV, rendered training images + masks, and a VOC-layout eval set.

`build_caption_file` produced `data/captions.tsv` (committed data; rerun only to change it). `make_sample` turns
it into a servable folder:

    <out_dir>/
      source.tsv                    copy of the bundled captions (first n_rows lines), CC12M layout
      images/<row>.jpg              one per row that has a URL (background only when the caption has no class)
      masks/<row>.png               P-mode PNG, 0 = background, i+1 = vocabulary.classes[i], 255 = ignore
      classes_per_row.parquet       sample_id, url, kind, classes (extractor), drawn (rendered, <= 3)
      eval/                         make_eval_set(): VOC layout over the sample's frequent classes (see make_sample)
      sample.json                   done-marker: parameters, input hash, counts (written last)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from curation.io import read_json, sha256_file, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from curation.sample.lock import making, replacing
from curation.sample.render import (
    IGNORE_LABEL,
    MAX_OBJECTS,
    RENDER_VERSION,
    TRAIN_SCENE_VERSION,
    encode_jpeg,
    encode_mask_png,
    render_sample,
)
from manifests.version import code_version
from manifests.vocabulary import load_vocabulary

SAMPLE_HOST = "cc4m-sample.invalid"  # reserved (RFC 2606): never resolvable, answered only by the sample's server
BUNDLED_CAPTIONS = Path(__file__).parent / "data" / "captions.tsv"
log = logging.getLogger(__name__)

# Deliberate download failures, chosen per row from a hash so the choice never depends on neighbours.
# Buckets out of 1000: 404 1.2 %, 500 0.8 %, slow 0.5 %, corrupt 0.7 %, notimage 0.8 % (4.0 % in all).
FAIL_BUCKETS: tuple[tuple[str, int], ...] = (("404", 12), ("500", 20), ("slow", 25), ("corrupt", 32), ("notimage", 40))
FAIL_KINDS: tuple[str, ...] = tuple(kind for kind, _ in FAIL_BUCKETS)
# Rows that are bad (or tricky) for INGEST, at fixed row numbers. Quote rows are moved to the next row with a
# vocabulary word so that they also travel through selection and download.
INGEST_ROWS: tuple[tuple[int, str], ...] = (
    (7, "quote_balanced"),
    (23, "empty_caption"),
    (41, "missing_tab"),
    (1500, "quote_unbalanced"),
    (2500, "empty_caption"),
    (3500, "missing_tab"),
)
# The first rows with a vocabulary word get one failure kind each, so a small n_rows sample still exercises all.
FORCED_FAILS_START = 2
# The eval set scores the classes drawn in at least this many servable training images (see make_sample).
EVAL_MIN_IMAGES = 15
# Side of the rendered training and eval images. The textures (3-px stripes, 2-px dots) and shapes are drawn in
# render pixels, so the tiny model's 64-px input sees them as drawn; rendered at 128 and shrunk to 64 they blurred
# into flat colours and 7 of the 22 eval classes (all cyan) differed only by a 2-3 patch wide shape (issue 19).
SAMPLE_IMAGE_SIZE = 64

_TRAIN_STREAM, _EVAL_VAL_STREAM, _EVAL_SELECTION_STREAM, _TRAIN_SCENE_STREAM = 0, 1, 2, 3


class ClassExtractor(Protocol):
    def classes_of(self, captions: Sequence[str]) -> Sequence[Iterable[str]]: ...


@dataclass(frozen=True)
class SampleInfo:
    root: Path
    source_tsv: Path  # CC12M layout (url<TAB>caption, no header); sha256 does not depend on the server port
    images_dir: Path
    masks_dir: Path
    eval_dir: Path
    classes_per_row: Path  # parquet: sample_id, url, kind, classes, drawn
    n_rows: int
    image_size: int
    seed: int


@dataclass(frozen=True)
class EvalSetInfo:
    root: Path
    val_ids: tuple[str, ...]  # ImageSets/Segmentation/val.txt: the held-out test images
    selection_ids: tuple[str, ...]  # ImageSets/Segmentation/train.txt: checkpoint selection (never trained on)
    image_size: int
    seed: int


# ---------------------------------------------------------------------------------------------------- captions
def fail_kind_of_row(row: int) -> str | None:
    """Hash-chosen failure kind of a row (None = a normal image)."""
    bucket = int.from_bytes(hashlib.sha256(f"cc4m-sample-row:{row}".encode()).digest()[:4], "big") % 1000
    for kind, upper in FAIL_BUCKETS:
        if bucket < upper:
            return kind
    return None


def url_for(row: int, kind: str | None) -> str:
    if kind is None or kind == "image":
        return f"http://{SAMPLE_HOST}/images/{row}.jpg"
    if kind not in FAIL_KINDS:
        raise ValueError(f"unknown url kind {kind!r}")
    return f"http://{SAMPLE_HOST}/fail/{kind}/{row}.jpg"


_URL_RE = re.compile(r"^http://[^/]+/(?:images/(\d+)\.jpg|fail/([a-z0-9]+)/(\d+)\.jpg)$")


def parse_sample_url(url: str) -> tuple[str, int] | None:
    """(kind, row) of a sample URL: kind is "image" or one of FAIL_KINDS; None for anything else."""
    match = _URL_RE.match(url)
    if not match:
        return None
    if match.group(1) is not None:
        return "image", int(match.group(1))
    kind = match.group(2)
    return (kind, int(match.group(3))) if kind in FAIL_KINDS else None


def _lexical_has_class(caption: str) -> bool:
    """Cheap stand-in for the entity extractor, used only to place the special rows (plural 's'/'es' stripped)."""
    words = {w.lower(): c for w, c in load_vocabulary().word_to_class.items()}
    for token in re.findall(r"[A-Za-z-]+", caption.lower()):
        if token in words or token.removesuffix("s") in words or token.removesuffix("es") in words:
            return True
    return False


def build_caption_file(src_tsv: str | Path, out_path: str | Path, n_rows: int = 4000) -> dict[str, Any]:
    """Write the bundled captions: the first `n_rows` rows of `src_tsv` with sample URLs and the special rows.

    Returns counts per url kind and per ingest-special kind. Deterministic: same source -> same bytes.
    """
    if n_rows < 100:
        raise ValueError(f"n_rows must be >= 100 (the special rows need room), got {n_rows}")
    lines = Path(src_tsv).read_text(encoding="utf-8").splitlines()
    if len(lines) < n_rows:
        raise ValueError(f"{src_tsv} has {len(lines)} rows, fewer than n_rows={n_rows}")
    captions: list[str] = []
    for number, line in enumerate(lines[:n_rows], start=1):
        url, sep, caption = line.partition("\t")
        if not sep or "\t" in caption or not caption.strip():
            raise ValueError(f"{src_tsv}:{number}: expected url<TAB>caption, got {line[:80]!r}")
        captions.append(caption)
    with_class = [i for i, c in enumerate(captions) if _lexical_has_class(c)]

    special: dict[int, str] = {}
    for row, kind in INGEST_ROWS:
        if row >= n_rows:
            continue
        if kind.startswith("quote"):
            row = next(i for i in with_class if i >= row and i not in special)
        special[row] = kind
    kinds: dict[int, str | None] = {i: fail_kind_of_row(i) for i in range(n_rows)}
    forced = [i for i in with_class if i >= FORCED_FAILS_START and i not in special][: len(FAIL_KINDS)]
    for row, kind in zip(forced, FAIL_KINDS):
        kinds[row] = kind

    out_lines: list[str] = []
    counts: dict[str, int] = {}
    for row, caption in enumerate(captions):
        kind = kinds[row]
        special_kind = special.get(row)
        if special_kind is not None:
            kind = None  # ingest-special rows download normally (when ingest keeps them)
            counts[special_kind] = counts.get(special_kind, 0) + 1
        url = url_for(row, kind)
        if special_kind == "empty_caption":
            line = f"{url}\t"
        elif special_kind == "missing_tab":
            line = f"{url} {caption}"
        elif special_kind == "quote_balanced":
            first, _, rest = caption.partition(" ")
            line = f'{url}\t"{first}" {rest}'.rstrip()
        elif special_kind == "quote_unbalanced":
            line = f'{url}\t"{caption}'
        else:
            line = f"{url}\t{caption}"
        counts[kind or "image"] = counts.get(kind or "image", 0) + 1
        out_lines.append(line)
    write_bytes_atomic(out_path, ("\n".join(out_lines) + "\n").encode("utf-8"))
    return {"rows": n_rows, "lexical_with_class": len(with_class), "special_rows": special, "kinds": counts}


@dataclass(frozen=True)
class CaptionRow:
    sample_id: int
    url: str | None  # None when the line has no tab (ingest rejects it)
    caption: str | None
    kind: str  # "image", a FAIL_KINDS entry, "missing_tab" or "empty_caption"


def read_caption_rows(path: str | Path, n_rows: int | None = None) -> list[CaptionRow]:
    """Rows of a sample TSV, with the same tolerance as ingest needs: no CSV quoting, split on the first tab."""
    text = Path(path).read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if n_rows is not None:
        lines = lines[:n_rows]
    rows: list[CaptionRow] = []
    for sample_id, line in enumerate(lines):
        url, sep, caption = line.partition("\t")
        if not sep:
            rows.append(CaptionRow(sample_id, None, None, "missing_tab"))
            continue
        parsed = parse_sample_url(url)
        if not caption.strip():
            rows.append(CaptionRow(sample_id, url, caption, "empty_caption"))
        else:
            rows.append(CaptionRow(sample_id, url, caption, parsed[0] if parsed else "image"))
    return rows


# ---------------------------------------------------------------------------------------------------- sample
def _default_extractor() -> ClassExtractor:
    from curation.entities import EntityExtractor  # helper A's module; imported late so render/server need no spaCy

    return EntityExtractor()


def _extractor_id(extractor: ClassExtractor) -> str:
    cls = type(extractor)
    return f"{cls.__module__}.{cls.__qualname__}:{getattr(extractor, 'version', '')}"


def _row_seed(seed: int, stream: int, index: int) -> list[int]:
    return [seed, stream, index]


def _inputs_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _is_done(marker: Path, inputs_hash: str) -> bool:
    if not marker.exists():
        return False
    try:
        return read_json(marker).get("inputs_hash") == inputs_hash
    except (OSError, ValueError):
        return False


def _replace_dir(staged: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)


def make_sample(
    out_dir: str | Path,
    *,
    n_rows: int | None = None,
    image_size: int = SAMPLE_IMAGE_SIZE,
    seed: int = 0,
    extractor: ClassExtractor | None = None,
    eval_images: int = 160,
    eval_selection_images: int = 80,
    eval_min_images: int = EVAL_MIN_IMAGES,
    eval_like_scenes: bool = True,
) -> SampleInfo:
    """Render the sample into `out_dir` (see module docstring); returns at once when it is already complete.

    Classes per row come from `extractor.classes_of(captions)` (default: curation.entities.EntityExtractor).
    Every row with a URL gets an image, so every non-failing URL serves a valid JPEG.

    The eval set scores the classes drawn in at least `eval_min_images` servable training images
    (`frequent_classes`), the way PASCAL VOC scores 20 classes that CC4M shows thousands of times each: a class
    the sample shows a handful of times cannot be learned from it, and 73 classes scored evenly would measure
    the long tail, not the method. When no class is that frequent (tiny test samples), every class is scored.

    `eval_like_scenes` (TRAIN_SCENE_VERSION): a training image shows 1-3 objects (uniform, like an eval image): its
    caption's classes, then further instances of them. Without it, each class is drawn once, so ~85% of the
    training images showed one large object while eval images show 2.1 smaller ones on average.
    """
    if n_rows is not None and n_rows <= 0:
        raise ValueError(f"n_rows must be positive or None, got {n_rows}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out_dir)
    info = SampleInfo(root=out, source_tsv=out / "source.tsv", images_dir=out / "images", masks_dir=out / "masks",
                      eval_dir=out / "eval", classes_per_row=out / "classes_per_row.parquet", n_rows=0,
                      image_size=image_size, seed=seed)
    marker = out / "sample.json"
    # Cheap identity first (no spaCy load) so a finished sample returns immediately.
    extractor_id = _extractor_id(extractor) if extractor is not None else "curation.entities.EntityExtractor:default"
    params = {
        "captions_sha256": sha256_file(BUNDLED_CAPTIONS), "n_rows": n_rows, "image_size": image_size, "seed": seed,
        "render_version": RENDER_VERSION, "extractor": extractor_id, "vocabulary": load_vocabulary().version,
        "eval_images": eval_images, "eval_selection_images": eval_selection_images,
        "eval_min_images": eval_min_images,
        "train_scenes": TRAIN_SCENE_VERSION if eval_like_scenes else "one-instance-per-class",
    }
    inputs_hash = _inputs_hash(params)
    if _is_done(marker, inputs_hash):
        return _with_rows(info, read_json(marker)["n_rows"])
    # Shared sample folders (curation.sample.lock): one maker at a time; a second one finds the sample complete
    # when the first is done and reuses it; a sample a running build downloads from is never replaced under it.
    with making(out):
        if _is_done(marker, inputs_hash):
            log.info("sample %s: made by another process meanwhile; reused", out)
            return _with_rows(info, read_json(marker)["n_rows"])
        with replacing(out):
            return _render(info, params, inputs_hash, n_rows, extractor, eval_images, eval_selection_images,
                           eval_min_images)


def _render(info: SampleInfo, params: dict[str, Any], inputs_hash: str, n_rows: int | None,
            extractor: ClassExtractor | None, eval_images: int, eval_selection_images: int,
            eval_min_images: int) -> SampleInfo:
    """The sample's files (make_sample holds the locks)."""
    out, marker, image_size, seed = info.root, info.root / "sample.json", info.image_size, info.seed
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    rows = _write_source(info, n_rows)
    classes_by_row = _classes_by_row(rows, extractor if extractor is not None else _default_extractor())
    drawn_by_row = _render_training_images(info, rows, classes_by_row,
                                           eval_like_scenes=params["train_scenes"] == TRAIN_SCENE_VERSION)
    _write_classes_per_row(info, rows, classes_by_row, drawn_by_row)
    servable = {r.sample_id for r in rows if r.kind == "image"}
    eval_classes = frequent_classes(
        [drawn for sample_id, drawn in drawn_by_row.items() if sample_id in servable], eval_min_images
    )
    make_eval_set(
        info.eval_dir, n_images=eval_images, n_selection=eval_selection_images, image_size=image_size, seed=seed + 1,
        classes=eval_classes or None,
    )
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    write_json_atomic(marker, {
        "inputs_hash": inputs_hash, "params": params, "n_rows": len(rows), "kinds": kinds,
        "rows_with_classes": sum(1 for r in rows if classes_by_row.get(r.sample_id)), "images": len(drawn_by_row),
        "code_version": code_version(),
    })
    return _with_rows(info, len(rows))


def _write_source(info: SampleInfo, n_rows: int | None) -> list[CaptionRow]:
    """The first `n_rows` bundled caption lines (all when None) -> source.tsv; returns its rows."""
    lines = BUNDLED_CAPTIONS.read_bytes().decode("utf-8").split("\n")[:-1]
    if n_rows is not None:
        lines = lines[:n_rows]
    write_bytes_atomic(info.source_tsv, ("\n".join(lines) + "\n").encode("utf-8"))
    return read_caption_rows(info.source_tsv)


def _classes_by_row(rows: list[CaptionRow], extractor: ClassExtractor) -> dict[int, list[str]]:
    captioned = [r for r in rows if r.kind not in ("missing_tab", "empty_caption")]
    found = extractor.classes_of([r.caption or "" for r in captioned])
    if len(found) != len(captioned):
        raise ValueError(f"extractor returned {len(found)} results for {len(captioned)} captions")
    return {r.sample_id: sorted(set(cls)) for r, cls in zip(captioned, found)}


def _render_training_images(info: SampleInfo, rows: list[CaptionRow], classes_by_row: dict[int, list[str]], *,
                            eval_like_scenes: bool) -> dict[int, list[str]]:
    """An image and a mask per row with a URL (staged, then swapped in whole); returns the classes drawn per row.
    `eval_like_scenes`: 1-3 objects per image (see make_sample)."""
    staging = info.root / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    (staging / "masks").mkdir()
    drawn_by_row: dict[int, list[str]] = {}
    for row in rows:
        if row.url is None:
            continue  # no URL, nothing to serve
        classes = classes_by_row.get(row.sample_id, [])
        n_objects = _scene_objects(info.seed, row.sample_id) if eval_like_scenes else None
        rendered = render_sample(classes, _row_seed(info.seed, _TRAIN_STREAM, row.sample_id), info.image_size,
                                 n_objects=n_objects, repeat_instances=False)
        (staging / "images" / f"{row.sample_id}.jpg").write_bytes(encode_jpeg(rendered.image))
        (staging / "masks" / f"{row.sample_id}.png").write_bytes(encode_mask_png(rendered.mask))
        drawn_by_row[row.sample_id] = list(rendered.classes)
    _replace_dir(staging / "images", info.images_dir)
    _replace_dir(staging / "masks", info.masks_dir)
    shutil.rmtree(staging)
    return drawn_by_row


def _write_classes_per_row(info: SampleInfo, rows: list[CaptionRow], classes_by_row: dict[int, list[str]],
                           drawn_by_row: dict[int, list[str]]) -> None:
    write_parquet_atomic(info.classes_per_row, pa.table({
        "sample_id": pa.array([r.sample_id for r in rows], pa.int64()),
        "url": pa.array([r.url for r in rows], pa.string()),
        "kind": pa.array([r.kind for r in rows], pa.string()),
        "classes": pa.array([classes_by_row.get(r.sample_id, []) for r in rows], pa.list_(pa.string())),
        "drawn": pa.array([drawn_by_row.get(r.sample_id, []) for r in rows], pa.list_(pa.string())),
    }))


def _scene_objects(seed: int, sample_id: int) -> int:
    """Objects in a training image, 1..MAX_OBJECTS uniform as in the eval set, from a stream of its own."""
    return int(np.random.default_rng([seed, _TRAIN_SCENE_STREAM, sample_id]).integers(1, MAX_OBJECTS + 1))


def _with_rows(info: SampleInfo, n_rows: int) -> SampleInfo:
    return SampleInfo(**{**asdict(info), "n_rows": n_rows})


# ---------------------------------------------------------------------------------------------------- eval set
def frequent_classes(drawn_per_image: Iterable[Sequence[str]], min_images: int) -> list[str]:
    """Vocabulary classes drawn in at least `min_images` of the given images, in vocabulary order."""
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    counts: dict[str, int] = {}
    for drawn in drawn_per_image:
        for c in set(drawn):
            counts[c] = counts.get(c, 0) + 1
    return [c for c in load_vocabulary().classes if counts.get(c, 0) >= min_images]


def _assign_eval_classes(rng: np.random.Generator, n_images: int, n_classes: int) -> list[list[int]]:
    """1-3 distinct classes per image, drawn from a shuffled cycle of all classes so each appears when it can."""
    counts = rng.integers(1, min(3, n_classes) + 1, size=n_images)  # never more distinct classes than exist
    pool: list[int] = []
    out: list[list[int]] = []
    for k in counts:
        picked: list[int] = []
        deferred: list[int] = []
        while len(picked) < k:
            if not pool:
                pool = list(rng.permutation(n_classes))
            c = int(pool.pop(0))
            (deferred if c in picked else picked).append(c)
        pool = deferred + pool
        out.append(picked)
    return out


def _add_hardness(acc: dict[str, list[float]], mask: np.ndarray, n_classes_drawn: int) -> None:
    acc["foreground"].append(float(np.mean(mask != 0)))  # objects incl. their ignore rim
    acc["labelled_foreground"].append(float(np.mean((mask != 0) & (mask != IGNORE_LABEL))))
    acc["objects"].append(float(n_classes_drawn))


def _world_summary(acc: dict[str, list[float]], n_classes: int) -> dict[str, Any]:
    """How hard the val split is (issue 19 keeps these from getting easier): classes scored, mean share of object
    pixels (with and without the ignore rim), mean objects (= classes, one instance each) per image, background."""
    def mean(key: str) -> float | None:
        return round(float(np.mean(acc[key])), 4) if acc[key] else None

    return {"classes_scored": n_classes, "foreground_fraction_mean": mean("foreground"),
            "labelled_foreground_fraction_mean": mean("labelled_foreground"),
            "objects_per_image_mean": mean("objects"), "instances_per_class": 1,
            "background": f"noisy low-saturation grey gradient ({RENDER_VERSION})"}


def make_eval_set(
    out_dir: str | Path,
    n_images: int = 80,
    image_size: int = SAMPLE_IMAGE_SIZE,
    seed: int = 1,
    *,
    n_selection: int = 40,
    classes: Sequence[str] | None = None,
) -> EvalSetInfo:
    """A small PASCAL-VOC-layout segmentation set of rendered images (1-3 classes each):

        JPEGImages/<id>.jpg, SegmentationClass/<id>.png (P-mode, VOC palette, 0 bg, i+1 class i, 255 ignore),
        ImageSets/Segmentation/val.txt    `n_images` test images ("val_NNNN"), covering every class at least once
                                          when n_images is large enough (1-3 classes each: needs >= 73 slots)
        ImageSets/Segmentation/train.txt  `n_selection` different images ("sel_NNNN") for checkpoint selection;
                                          named train.txt so VOC loaders find it, but it is NOT training data
        classes.txt                       "background" then the scored classes, one per line (line i = mask value i)
        eval.json                         done-marker with parameters and per-class counts

    `classes`: the vocabulary classes to draw and score (default: all 73), in vocabulary order in classes.txt.
    Seeds come from streams the training images never use, so eval images are held out.
    """
    if not 1 <= n_images <= 10000 or not 0 <= n_selection <= 10000:
        raise ValueError(f"n_images must be in 1..10000 and n_selection in 0..10000, got {n_images}, {n_selection}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out_dir)
    classes = _eval_classes(classes)
    params = {
        "n_images": n_images, "n_selection": n_selection, "image_size": image_size, "seed": seed,
        "render_version": RENDER_VERSION, "vocabulary": load_vocabulary().version, "classes": list(classes),
    }
    inputs_hash = _inputs_hash(params)
    marker = out / "eval.json"
    if _is_done(marker, inputs_hash):
        done = read_json(marker)
        return EvalSetInfo(out, tuple(done["val_ids"]), tuple(done["selection_ids"]), image_size, seed)

    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    staging = out / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (staging / sub).mkdir(parents=True)
    per_class = {c: 0 for c in classes}
    hardness: dict[str, list[float]] = {"foreground": [], "labelled_foreground": [], "objects": []}
    splits = {
        split: _render_eval_split(staging, split, prefix, stream, count, classes, seed, image_size, per_class,
                                  hardness)
        for split, prefix, stream, count in (("val", "val", _EVAL_VAL_STREAM, n_images),
                                             ("train", "sel", _EVAL_SELECTION_STREAM, n_selection))
    }
    (staging / "classes.txt").write_text("\n".join(("background", *classes)) + "\n", encoding="utf-8")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets"):
        _replace_dir(staging / sub, out / sub)
    (staging / "classes.txt").replace(out / "classes.txt")
    shutil.rmtree(staging)
    write_json_atomic(marker, {
        "inputs_hash": inputs_hash, "params": params, "val_ids": splits["val"], "selection_ids": splits["train"],
        "val_images_per_class": per_class, "classes_missing_from_val": [c for c, n in per_class.items() if n == 0],
        "world": _world_summary(hardness, len(classes)), "code_version": code_version(),
    })
    return EvalSetInfo(out, tuple(splits["val"]), tuple(splits["train"]), image_size, seed)


def _eval_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The classes to score, in vocabulary order (all of them when None)."""
    vocabulary = load_vocabulary().classes
    if classes is None:
        return tuple(vocabulary)
    wanted = set(classes)
    unknown = sorted(wanted - set(vocabulary))
    if unknown or not wanted:
        raise ValueError(f"eval classes must be a non-empty subset of the vocabulary, unknown: {unknown}")
    return tuple(c for c in vocabulary if c in wanted)


def _render_eval_split(staging: Path, split: str, prefix: str, stream: int, count: int, classes: tuple[str, ...],
                       seed: int, image_size: int, per_class: dict[str, int],
                       hardness: dict[str, list[float]]) -> list[str]:
    """`count` images and masks of one split into `staging` and its ImageSets list; counts val images per class and
    adds each val image to `hardness` (see _world_summary)."""
    # Masks are rendered with vocabulary labels (i + 1); the eval set's labels are positions in classes.txt.
    vocabulary = load_vocabulary().classes
    to_eval_label = np.zeros(256, dtype=np.uint8)
    to_eval_label[IGNORE_LABEL] = IGNORE_LABEL
    for position, name in enumerate(classes, start=1):
        to_eval_label[vocabulary.index(name) + 1] = position
    rng = np.random.default_rng([seed, stream])
    ids: list[str] = []
    for i, class_ids in enumerate(_assign_eval_classes(rng, count, len(classes))):
        image_id = f"{prefix}_{i:04d}"
        rendered = render_sample([classes[c] for c in class_ids], _row_seed(seed, stream, i), image_size)
        (staging / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode_jpeg(rendered.image, quality=95))
        mask = to_eval_label[rendered.mask]
        (staging / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_mask_png(mask))
        if split == "val":
            for c in rendered.classes:
                per_class[c] += 1
            _add_hardness(hardness, mask, len(rendered.classes))
        ids.append(image_id)
    (staging / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return ids
