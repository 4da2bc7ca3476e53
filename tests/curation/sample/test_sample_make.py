from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.io import read_json
from curation.sample import BUNDLED_CAPTIONS, SampleInfo, make_eval_set, make_sample
from manifests.vocabulary import load_vocabulary

CLASSES = load_vocabulary().classes


def test_sample_folder_contents(small_sample: SampleInfo) -> None:
    info = small_sample
    assert info.n_rows == 60
    bundled = BUNDLED_CAPTIONS.read_bytes().split(b"\n")[:60]
    assert info.source_tsv.read_bytes() == b"\n".join(bundled) + b"\n"
    table = pq.read_table(info.classes_per_row).to_pylist()
    assert [r["sample_id"] for r in table] == list(range(60))
    with_url = [r for r in table if r["url"] is not None]
    assert len(with_url) == 59  # the missing-tab row has no URL
    assert any(r["classes"] for r in table) and any(not r["classes"] for r in with_url)
    for r in with_url:  # every URL row has an image (background only without classes) and a matching mask
        image = Image.open(info.images_dir / f"{r['sample_id']}.jpg")
        assert image.format == "JPEG" and image.size == (64, 64)
        mask = np.asarray(Image.open(info.masks_dir / f"{r['sample_id']}.png"))
        assert set(np.unique(mask).tolist()) - {0, 255} == {CLASSES.index(c) + 1 for c in r["drawn"]}
        assert set(r["drawn"]) <= set(r["classes"]) and len(r["drawn"]) == min(3, len(r["classes"]))
    assert (info.eval_dir / "ImageSets" / "Segmentation" / "val.txt").exists()


def test_make_sample_is_idempotent(small_sample: SampleInfo, lexical_extractor) -> None:
    marker = small_sample.root / "sample.json"
    before = marker.stat().st_mtime_ns, (small_sample.images_dir / "0.jpg").stat().st_mtime_ns
    again = make_sample(
        small_sample.root,
        n_rows=60,
        image_size=64,
        extractor=lexical_extractor,
        eval_images=20,
        eval_selection_images=5,
    )
    assert again == small_sample
    assert (marker.stat().st_mtime_ns, (small_sample.images_dir / "0.jpg").stat().st_mtime_ns) == before
    assert read_json(marker)["n_rows"] == 60


def test_changed_parameters_rebuild(tmp_path: Path, lexical_extractor) -> None:
    first = make_sample(
        tmp_path / "s", n_rows=10, image_size=48, extractor=lexical_extractor, eval_images=3, eval_selection_images=1
    )
    second = make_sample(
        tmp_path / "s", n_rows=12, image_size=48, extractor=lexical_extractor, eval_images=3, eval_selection_images=1
    )
    assert first.n_rows == 10 and second.n_rows == 12
    assert len(list(second.images_dir.glob("*.jpg"))) == 12
    with pytest.raises(ValueError, match="n_rows"):
        make_sample(tmp_path / "bad", n_rows=0, extractor=lexical_extractor)


def test_eval_set_voc_layout(tmp_path: Path) -> None:
    info = make_eval_set(tmp_path / "eval", n_images=80, image_size=64, seed=1, n_selection=10)
    root = info.root
    classes_txt = (root / "classes.txt").read_text().splitlines()
    assert classes_txt == ["background", *CLASSES]
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    selection = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(val) == 80 and len(selection) == 10 and not set(val) & set(selection)
    assert list(info.val_ids) == val and list(info.selection_ids) == selection
    seen: set[int] = set()
    for image_id in val + selection:
        image = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
        mask_img = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert image.mode == "RGB" and image.size == (64, 64) and mask_img.mode == "P" and mask_img.size == (64, 64)
        labels = set(np.unique(np.asarray(mask_img)).tolist())
        objects = labels - {0, 255}
        assert 0 in labels and 1 <= len(objects) <= 3 and max(objects) <= len(CLASSES)
        if image_id in val:
            seen |= objects
    assert seen == set(range(1, len(CLASSES) + 1))  # every class appears in val at least once
    assert read_json(root / "eval.json")["classes_missing_from_val"] == []
    # Held out: eval images differ from training images of the same size and seed streams.
    assert make_eval_set(tmp_path / "eval", n_images=80, image_size=64, seed=1, n_selection=10) == info


def test_eval_set_on_a_class_subset_relabels_masks_to_its_classes_txt(tmp_path: Path) -> None:
    subset = ["dog", "car", "people"]  # given out of order: classes.txt keeps vocabulary order
    info = make_eval_set(tmp_path / "eval", n_images=12, image_size=48, seed=3, n_selection=2, classes=subset)
    classes_txt = (info.root / "classes.txt").read_text().splitlines()
    expected = [c for c in CLASSES if c in subset]
    assert classes_txt == ["background", *expected]
    seen: set[int] = set()
    for image_id in info.val_ids:
        labels = set(np.unique(np.asarray(Image.open(info.root / "SegmentationClass" / f"{image_id}.png"))).tolist())
        assert labels <= {0, 255, 1, 2, 3}
        seen |= labels - {0, 255}
    assert seen == {1, 2, 3}
    done = read_json(info.root / "eval.json")
    assert sorted(done["val_images_per_class"]) == sorted(subset) and done["params"]["classes"] == expected
    with pytest.raises(ValueError, match="subset of the vocabulary"):
        make_eval_set(tmp_path / "bad", n_images=2, classes=["dragon"])
    with pytest.raises(ValueError, match="subset of the vocabulary"):
        make_eval_set(tmp_path / "bad", n_images=2, classes=[])


def test_frequent_classes_counts_images_not_mentions() -> None:
    from curation.sample.make import frequent_classes

    drawn = [["dog", "dog", "car"], ["dog"], ["car"], ["people"]]
    assert frequent_classes(drawn, 2) == [c for c in CLASSES if c in ("car", "dog")]
    assert frequent_classes(drawn, 3) == []
    with pytest.raises(ValueError):
        frequent_classes(drawn, 0)


def test_sample_eval_set_scores_the_frequent_training_classes(tmp_path: Path) -> None:
    from curation.sample.make import frequent_classes

    info = make_sample(tmp_path / "s", n_rows=60, image_size=32, extractor=_FixedExtractor(), eval_images=4,
                       eval_selection_images=1, eval_min_images=10)
    rows = pq.read_table(info.classes_per_row).to_pylist()
    servable = [r["drawn"] for r in rows if r["kind"] == "image"]
    expected = frequent_classes(servable, 10)
    assert expected and len(expected) < len(CLASSES)
    assert (info.eval_dir / "classes.txt").read_text().splitlines() == ["background", *expected]


class _FixedExtractor:
    """Every caption shows a dog; every third also a car: dog is frequent, car is not (at min 10 of ~55)."""

    def classes_of(self, captions):
        return [["dog", "car"] if i % 3 == 0 and i < 12 else ["dog"] for i, _ in enumerate(captions)]


def test_default_extractor_is_the_entity_extractor(tmp_path: Path) -> None:
    pytest.importorskip("curation.entities")
    info = make_sample(tmp_path / "s", n_rows=30, image_size=32, eval_images=2, eval_selection_images=1)
    table = pq.read_table(info.classes_per_row).to_pylist()
    assert any(r["classes"] for r in table)
    assert "EntityExtractor" in read_json(info.root / "sample.json")["params"]["extractor"]


def test_cli_makes_the_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("curation.entities")
    from curation.sample.cli import main

    assert main(["--out", str(tmp_path / "s"), "--rows", "12", "--image-size", "32"]) == 0
    assert '"n_rows": 12' in capsys.readouterr().out
    assert (tmp_path / "s" / "sample.json").exists()


def test_eval_json_records_how_hard_the_eval_world_is(tmp_path: Path) -> None:
    info = make_eval_set(tmp_path / "eval", n_images=12, image_size=64, seed=3, n_selection=2,
                         classes=["dog", "car", "cat"])
    world = read_json(info.root / "eval.json")["world"]
    masks = [np.asarray(Image.open(info.root / "SegmentationClass" / f"{i}.png")) for i in info.val_ids]
    assert world["classes_scored"] == 3
    assert world["foreground_fraction_mean"] == pytest.approx(np.mean([(m != 0).mean() for m in masks]), abs=1e-4)
    labelled = np.mean([((m != 0) & (m != 255)).mean() for m in masks])
    assert world["labelled_foreground_fraction_mean"] == pytest.approx(labelled, abs=1e-4)
    objects = np.mean([len(set(np.unique(m).tolist()) - {0, 255}) for m in masks])
    assert world["objects_per_image_mean"] == pytest.approx(objects, abs=1e-4)
    assert "noisy" in world["background"]


def test_training_scenes_show_one_to_three_objects_of_the_caption_classes(small_sample: SampleInfo) -> None:
    table = [r for r in pq.read_table(small_sample.classes_per_row).to_pylist() if r["drawn"]]
    counts = []
    for r in table:
        mask = np.asarray(Image.open(small_sample.masks_dir / f"{r['sample_id']}.png"))
        labels = {CLASSES.index(c) + 1 for c in r["drawn"]}
        assert set(np.unique(mask).tolist()) - {0, 255} == labels
        from scipy import ndimage

        counts.append(sum(ndimage.label(mask == label)[1] for label in labels))
    assert min(counts) >= 1 and max(counts) <= 3
    assert sum(c > len(r["drawn"]) for c, r in zip(counts, table)) > 0  # some images got further instances
