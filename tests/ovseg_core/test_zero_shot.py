"""Zero-shot classifier and segmenter, checked against hand-computed cases with a fake grouping model."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.zero_shot import ZeroShotSegmenter, build_zero_shot_classifier, get_templates
from ovseg_core.zero_shot.segment import effective_logit_scale, resized_size, sliding_windows
from ovseg_core.zero_shot.templates import (
    ADE20K_CLASSES,
    COCO_OBJECT_CLASSES,
    CONTEXT_CLASSES,
    IMAGENET_TEMPLATES,
    SUBSET_TEMPLATES,
    TCL_TEMPLATES,
    VOC_CLASSES,
    sample_classes,
)


@dataclass
class FakeImageOutput:
    image_emb: torch.Tensor
    group_emb: torch.Tensor
    assign: torch.Tensor


def unit(*values: float) -> torch.Tensor:
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


class FakeGroupingModel(nn.Module):
    """Deterministic stand-in for OVSegmentor: patch p of the image joins group round(mean of channel 0 over p).

    Group and image embeddings are fixed, so the segmentation is a local function of the pixels (translation
    equivariant) and every score can be computed by hand. Texts embed as the vector of the class name they contain.
    """

    def __init__(
        self,
        texts: dict[str, torch.Tensor],
        groups: torch.Tensor,
        image_emb: torch.Tensor,
        scale: float,
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        self.texts = texts
        self.register_buffer("groups", F.normalize(groups, dim=-1))
        self.register_buffer("image_vec", F.normalize(image_emb, dim=-1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))  # CLIP convention: log of the scale
        self.patch_size = patch_size
        self.image_size = 32
        self.calls: list[tuple[int, ...]] = []
        self.training_during_calls: list[bool] = []

    def encode_image(self, images: torch.Tensor) -> FakeImageOutput:
        self.calls.append(tuple(images.shape))
        assert images.shape[-2] % self.patch_size == 0 and images.shape[-1] % self.patch_size == 0, images.shape
        self.training_during_calls.append(self.training)
        num_groups = self.groups.shape[0]
        codes = F.avg_pool2d(images[:, :1], self.patch_size).round().long().clamp(0, num_groups - 1)[:, 0]
        assign = F.one_hot(codes, num_groups).permute(0, 3, 1, 2).float()
        batch = images.shape[0]
        return FakeImageOutput(self.image_vec.expand(batch, -1), self.groups.expand(batch, -1, -1), assign)

    def encode_text_strings(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            names = [name for name in self.texts if name in text]
            assert names, f"fake text encoder knows no class in {text!r}"
            rows.append(self.texts[max(names, key=len)])
        return torch.stack(rows)


E = torch.eye(4)
CLASSES = ("background", "cat", "dog", "car")
TEXTS = {"cat": E[0], "dog": E[1], "car": E[2]}


def stripes_image(codes: list[int], stripe: int = 8, height: int = 8) -> torch.Tensor:
    """(3, H, W) image whose channel 0 holds the group code of each vertical stripe."""
    row = torch.tensor([c for c in codes for _ in range(stripe)], dtype=torch.float32)
    return row.expand(3, height, -1).clone()


# ------------------------------------------------------------------ templates and class lists


def test_template_sets_and_class_lists_have_the_documented_sizes():
    assert get_templates("single") == ("a photo of a {}.",)
    assert len(SUBSET_TEMPLATES) == 7 and len(TCL_TEMPLATES) == 9 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + TCL_TEMPLATES)
    assert (len(VOC_CLASSES), len(CONTEXT_CLASSES), len(COCO_OBJECT_CLASSES), len(ADE20K_CLASSES)) == (21, 60, 81, 150)
    assert VOC_CLASSES[0] == CONTEXT_CLASSES[0] == COCO_OBJECT_CLASSES[0] == "background"
    assert "background" not in ADE20K_CLASSES
    sample = sample_classes()
    assert sample[0] == "background" and len(sample) == 74 and sample[1] == "people"
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nope")


# ------------------------------------------------------------------ classifier


class HashTextModel(nn.Module):
    """Text encoder returning unnormalised pseudo-random vectors keyed by the exact prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def encode_text_strings(self, texts: list[str]) -> torch.Tensor:
        self.modes.append(self.training)
        rows = []
        for text in texts:
            gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append(torch.randn(8, generator=gen) * (1 + len(text)))
        return torch.stack(rows)


def test_classifier_averages_normalised_prompt_embeddings_and_renormalises():
    model = HashTextModel().train()
    templates = ("a photo of a {}.", "art of the {}.", "a {} in a video game.")
    weights = build_zero_shot_classifier(model, ["cat", "dog"], templates, batch_size=2)
    assert weights.shape == (2, 8)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2))
    for row, name in zip(weights, ["cat", "dog"]):
        per_template = F.normalize(model.encode_text_strings([t.format(name) for t in templates]), dim=-1)
        torch.testing.assert_close(row, F.normalize(per_template.mean(0), dim=0))
    torch.testing.assert_close(build_zero_shot_classifier(model, ["cat", "dog"], templates, batch_size=1), weights)
    assert model.training and model.modes[0] is False  # eval inside, previous mode restored
    with pytest.raises(ValueError, match="placeholder"):
        build_zero_shot_classifier(model, ["cat"], ["no placeholder"])


# ------------------------------------------------------------------ scoring, background, top-k


def make_stripe_model(scale: float = math.log(2.0)) -> FakeGroupingModel:
    # group 0 = cat, group 1 = dog, group 2 orthogonal to every class (uniform scores).
    return FakeGroupingModel(TEXTS, torch.stack([E[0], E[1], E[3]]), image_emb=E[0] + E[1] + E[2], scale=scale)


def test_hand_computed_scores_and_background_rule():
    # scale ln 2: cat group logits (ln2, 0, 0) -> softmax (1/2, 1/4, 1/4); topk=None keeps all classes, so
    # affinity = softmax^2 = (1/4, 1/16, 1/16); the orthogonal group gets 1/9 everywhere. Max affinity = 1/4.
    model = make_stripe_model()
    image = stripes_image([0, 1, 2])
    seg = ZeroShotSegmenter(model, CLASSES, bg_thresh=0.95, topk=None)
    logits = seg.predict_logits(image)
    assert logits.shape == (4, 8, 24)
    torch.testing.assert_close(logits[:, 0, 0], torch.tensor([0.0, 1 / 4, 1 / 16, 1 / 16]))
    torch.testing.assert_close(logits[:, 0, 12], torch.tensor([0.0, 1 / 16, 1 / 4, 1 / 16]))
    torch.testing.assert_close(logits[:, 0, 20], torch.tensor([1.0, 1 / 9, 1 / 9, 1 / 9]))
    expected = torch.tensor([1] * 8 + [2] * 8 + [0] * 8).expand(8, -1)
    # bg_thresh 0.95 is above every score: min(0.95, max affinity = 1/4) keeps the cat and dog groups foreground.
    assert torch.equal(seg.predict(image), expected)
    assert torch.equal(ZeroShotSegmenter(model, CLASSES, bg_thresh=0.2, topk=None).predict(image), expected)
    # Below 1/9 nothing is background any more.
    low = ZeroShotSegmenter(model, CLASSES, bg_thresh=0.1, topk=None).predict(image)
    assert (low != 0).all() and torch.equal(low[:, :16], expected[:, :16])
    # Without a background class label 0 is a real class (cat) and no thresholding happens.
    no_bg = ZeroShotSegmenter(model, ("cat", "dog", "car"), topk=None).predict(image)
    assert no_bg.unique().tolist() == [0, 1] and torch.equal(no_bg[:, :16], expected[:, :16] - 1)


def test_soft_assignment_matches_hard_inside_regions():
    model = make_stripe_model()
    image = stripes_image([0, 1, 2], stripe=16, height=16)
    hard = ZeroShotSegmenter(model, CLASSES, topk=None, assignment="hard").predict(image)
    soft = ZeroShotSegmenter(model, CLASSES, topk=None, assignment="soft").predict(image)
    interior = torch.cat([torch.arange(0, 12), torch.arange(20, 28), torch.arange(36, 48)])
    assert torch.equal(hard[:, interior], soft[:, interior])


def test_topk_restriction_changes_the_prediction():
    # The only group leans to dog (0.9 cat + 1.0 dog) but the image embedding ranks cat and car first: with top-2 dog
    # is dropped, the group re-softmaxes over {cat, car} and becomes cat.
    model = FakeGroupingModel(TEXTS, (0.9 * E[0] + E[1])[None], image_emb=E[0] + 0.9 * E[2], scale=10.0)
    image = torch.zeros(3, 8, 8)
    unrestricted = ZeroShotSegmenter(model, CLASSES, topk=None).predict(image)
    restricted = ZeroShotSegmenter(model, CLASSES, topk=2).predict(image)
    assert (unrestricted == CLASSES.index("dog")).all()
    assert (restricted == CLASSES.index("cat")).all()
    logits = ZeroShotSegmenter(model, CLASSES, topk=2).predict_logits(image)
    assert (logits[CLASSES.index("dog")] == 0).all()  # dropped classes score exactly 0


def test_logit_scale_is_exponentiated_and_clamped_to_100():
    model = make_stripe_model(scale=1000.0)
    assert effective_logit_scale(model).item() == pytest.approx(100.0)
    assert effective_logit_scale(make_stripe_model(scale=7.0)).item() == pytest.approx(7.0)


# ------------------------------------------------------------------ sliding window and resizing


def block_image(height: int, width: int) -> torch.Tensor:
    """Blocks whose borders (8, 24, 40, 56) never fall on a window border (multiples of 16)."""
    ys, xs = torch.arange(height), torch.arange(width)
    by, bx = (ys + 8) // 16, (xs + 8) // 16
    codes = (bx[None, :] + 2 * by[:, None]) % 4
    return codes.float().expand(3, -1, -1).clone()


def test_sliding_window_equals_single_pass_for_a_translation_equivariant_model():
    groups = torch.stack([E[0], E[1], E[2], E[3]])
    model = FakeGroupingModel(TEXTS, groups, image_emb=E[0] + E[1] + E[2], scale=20.0)
    image = block_image(48, 64)
    whole = ZeroShotSegmenter(model, CLASSES, window=None).predict_logits(image)
    model.calls.clear()
    slide = ZeroShotSegmenter(model, CLASSES, window=32, stride=16, window_batch_size=8).predict_logits(image)
    torch.testing.assert_close(slide, whole)
    assert model.calls == [(6, 3, 32, 32)]  # 2 rows x 3 columns of 32-px crops, scored in one batch
    pred = ZeroShotSegmenter(model, CLASSES, window=32, stride=16).predict(image)
    assert set(pred.unique().tolist()) == {0, 1, 2, 3}


def test_sliding_windows_cover_odd_sizes_and_small_images():
    for height, width in [(50, 37), (32, 32), (20, 70), (10, 10)]:
        boxes = sliding_windows(height, width, window=32, stride=16)
        covered = torch.zeros(height, width, dtype=torch.int64)
        for y1, y2, x1, x2 in boxes:
            assert y2 - y1 == min(32, height) and x2 - x1 == min(32, width)
            covered[y1:y2, x1:x2] += 1
        assert (covered > 0).all()
    model = make_stripe_model()
    seg = ZeroShotSegmenter(model, CLASSES, window=32, stride=16, topk=None)
    assert seg.predict(block_image(50, 37)).shape == (50, 37)
    assert seg.predict(block_image(10, 12)).shape == (10, 12)


def test_sizes_that_are_not_patch_multiples_are_padded_then_cropped():
    model = make_stripe_model()
    image = stripes_image([0, 1, 2], stripe=5, height=10)  # 10 x 15 with 4-px patches
    pred = ZeroShotSegmenter(model, CLASSES, topk=None).predict(image)
    assert pred.shape == (10, 15) and model.calls[-1] == (1, 3, 12, 16)
    assert (pred[:, :3] == 1).all() and (pred[:, 13:] == 0).all()


def test_short_side_resize_runs_at_scale_and_returns_original_size():
    assert resized_size(20, 30, 40, 2048) == (40, 60)
    assert resized_size(100, 1000, 448, 2048) == (205, 2048)  # long side capped, like mmseg img_scale=(2048, 448)
    model = make_stripe_model()
    seg = ZeroShotSegmenter(model, CLASSES, short_side=40, window=32, stride=16, topk=None)
    model.calls.clear()
    image = stripes_image([0, 1, 2], stripe=10, height=20)
    pred = seg.predict(image)
    assert pred.shape == (20, 30)
    assert all(call[-2:] == (32, 32) for call in model.calls)
    assert (pred[:, :8] == 1).all() and (pred[:, 12:18] == 2).all() and (pred[:, 22:] == 0).all()


def test_model_mode_is_restored_and_eval_used_inside():
    model = make_stripe_model().train()
    seg = ZeroShotSegmenter(model, CLASSES)
    seg.predict(stripes_image([0, 1]))
    assert model.training and model.training_during_calls == [False]


def test_invalid_settings_are_rejected():
    model = make_stripe_model()
    with pytest.raises(ValueError, match="stride"):
        ZeroShotSegmenter(model, CLASSES, window=16, stride=32)
    with pytest.raises(ValueError, match="topk"):
        ZeroShotSegmenter(model, CLASSES, topk=0)
    with pytest.raises(ValueError, match="assignment"):
        ZeroShotSegmenter(model, CLASSES, assignment="median")
    with pytest.raises(ValueError, match="no foreground"):
        ZeroShotSegmenter(model, ("background",))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        ZeroShotSegmenter(model, CLASSES).predict(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------ PAMR refinement (ovseg_core.zero_shot.refine)


def edge_image(width: int = 32, edge: int = 13, seed: int = 0) -> torch.Tensor:
    """(1, 3, W, W): dark left of column `edge`, bright from it on, with a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, width, width)
    image[..., edge:] = 1.0
    return image + 0.02 * torch.randn(image.shape, generator=g)


def test_pamr_affinity_is_a_distribution_that_ignores_the_other_side_of_an_edge():
    from ovseg_core.zero_shot.refine import pixel_affinity

    image = edge_image()
    weights = pixel_affinity(image, dilations=(1, 2))
    assert weights.shape == (1, 16, 32, 32)
    torch.testing.assert_close(weights.sum(1), torch.ones(1, 32, 32))
    # Pixel (5, 12) sits left of the edge; its right neighbours at dilations 1 and 2 (columns 13, 14) are bright.
    right = [2, 4, 7, 8 + 2, 8 + 4, 8 + 7]  # offsets (-1, +1), (0, +1), (+1, +1) at each dilation
    assert weights[0, right, 5, 12].sum() < 1e-3 and weights[0, :, 5, 12].max() > 0.05


def test_pamr_snaps_blurred_scores_to_the_image_edge_and_keeps_flat_scores():
    from ovseg_core.zero_shot.refine import pamr

    image = edge_image()
    # Class 1's score ramps up over columns 9..20 (a bilinearly upsampled patch grid): its 0.5 crossing is at
    # column 15 (a tie, which arg-max gives class 0): columns 13-15 start on the wrong side of the edge at 13.
    ramp = ((torch.arange(32, dtype=torch.float32) - 9) / 12).clamp(0, 1).expand(1, 1, 32, 32)
    scores = torch.cat([1 - ramp, ramp], dim=1)
    before = scores.argmax(1)
    after = pamr(image, scores, iterations=10, dilations=(1, 2, 4, 8)).argmax(1)
    truth = (torch.arange(32) >= 13).long().expand(1, 32, 32)
    assert (before != truth).sum() == 3 * 32 and torch.equal(after, truth)
    flat = torch.full((1, 2, 32, 32), 0.25)
    torch.testing.assert_close(pamr(image, flat), flat)
    with pytest.raises(ValueError, match="share"):
        pamr(image, scores[..., :16])


def test_pamr_refines_each_channel_on_its_own_and_matches_the_stacked_formula():
    from ovseg_core.zero_shot.refine import _neighbours, pamr, pixel_affinity

    image = edge_image(width=24)
    scores = torch.rand(1, 5, 24, 24, generator=torch.Generator().manual_seed(3))
    full = pamr(image, scores, iterations=3, dilations=(1, 2, 4))
    # bit for bit: a channel's result does not depend on the channels refined with it (what memoisation relies on)
    assert torch.equal(pamr(image, scores[:, [3, 1]], iterations=3, dilations=(1, 2, 4)), full[:, [3, 1]])
    # the paper's formula, all neighbours stacked: out = sum_p affinity_p * neighbour_p, three times
    affinity = pixel_affinity(image, (1, 2, 4))[:, None]
    expected = scores
    for _ in range(3):
        expected = (_neighbours(expected, (1, 2, 4)) * affinity).sum(dim=2)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)


def test_memoised_pamr_is_bit_identical_and_refines_each_distinct_channel_once():
    from ovseg_core.zero_shot.refine import MemoisedPamr, pamr

    image = edge_image(width=24)
    g = torch.Generator().manual_seed(4)
    classes = torch.rand(1, 4, 24, 24, generator=g)
    memo = MemoisedPamr(iterations=4, dilations=(1, 3))
    calls = []
    # three "candidates" of one sweep: same class channels, a different background channel each, zeroed classes
    for threshold in (0.6, 0.75, 0.9):
        background = (classes.max(1, keepdim=True).values < threshold).float()
        scores = torch.cat([background, classes * (classes > 0.3), torch.zeros(1, 2, 24, 24)], dim=1)
        calls.append(scores)
        assert torch.equal(memo(image, scores), pamr(image, scores, iterations=4, dilations=(1, 3)))
    distinct = {c.numpy().tobytes() for scores in calls for c in scores[0]}
    assert memo.channels_refined == len(distinct) == 4 + 3 + 1  # classes once, 3 backgrounds, one zero channel
    memo.clear()
    assert torch.equal(memo(image, calls[0]), pamr(image, calls[0], iterations=4, dilations=(1, 3)))
    assert memo.channels_refined == 8 + 6  # after clear() everything is refined again (zeros twice in calls[0])
    with pytest.raises(ValueError, match="one image"):
        memo(torch.cat([image, image]), torch.cat([calls[0], calls[0]]))
    with pytest.raises(ValueError, match="share"):
        memo(image, calls[0][..., :12])


def test_segmenter_refine_option_is_validated_recorded_and_keeps_aligned_regions():
    model = make_stripe_model()
    image = stripes_image([0, 1, 2], stripe=16, height=16)
    plain = ZeroShotSegmenter(model, CLASSES, topk=None).predict(image)
    seg = ZeroShotSegmenter(model, CLASSES, topk=None, refine="pamr")
    assert seg.settings()["refine"] == "pamr"
    assert torch.equal(seg.predict(image), plain)  # the stripes already follow the image's edges
    with pytest.raises(ValueError, match="refine"):
        ZeroShotSegmenter(model, CLASSES, refine="crf")
