"""Zero-shot semantic segmentation with a grouping model (GroupViT / OVSegmentor inference protocol).

Per crop (``group_vit_seg.py`` of GroupViT/OVSegmentor, re-implemented without mmseg):

1. ``group_emb @ text.T * scale`` -> softmax over the foreground classes ("unrestricted" scores, (G, K)).
2. Rank classes by the image-level embedding's softmax and keep only the ``topk`` best; re-softmax the group logits
   over those classes (others get 0).
3. Multiply the restricted scores by the unrestricted ones: ``affinity = restricted * unrestricted``.
   With ``topk=None`` (or ``topk >= K``) every class is kept, so ``affinity = unrestricted ** 2``: the same formula
   GroupViT applies when a dataset has <= 5 classes.
4. The soft group assignment (G, h, w) over patches is upsampled bilinearly to the crop's pixels. ``assignment="hard"``
   (the paper's protocol, default) then takes the argmax group per pixel as a one-hot, so each pixel gets its group's
   affinity row; ``assignment="soft"`` weights the groups' rows by the upsampled soft assignment instead.
5. Background (only when the class list has one, at index 0): a pixel is background when its best foreground score
   is below ``min(bg_thresh, affinity.max())``, where the max is over all groups and classes of the crop. The ``min``
   keeps at least the most confident group foreground even when every score is below ``bg_thresh``. Background
   pixels get 1 in channel 0 (above any foreground score, which is a product of two probabilities), others 0.

Around that (mmseg test pipeline): the image is first resized so its short side is ``short_side`` (long side capped
at ``max_long_side``, mmseg's ``img_scale=(2048, 448)`` keep-ratio rule), then scored whole (``window=None``) or by a
sliding window (``window`` x ``window`` crops every ``stride`` pixels, the last crop of a row/column shifted back to
end at the border, crops smaller than the window when the image is), overlapping scores averaged, and the score map
resized bilinearly back to the original size. Paper setting: short_side=448, window=448, stride=224, top-5,
single prompt, bg_thresh 0.95 (VOC) / 0.35 (Context) / 0.9 (COCO-Object).

Model interface used: ``encode_image(images) -> obj with .image_emb (B,D), .group_emb (B,G,D), .assign (B,G,h,w)``,
``encode_text_strings``, ``logit_scale`` (log of the scale, CLIP convention: used as ``exp()`` clamped to 100).
The model must accept crops of any size that is a multiple of ``model.patch_size`` (OVSegmentor resamples its
position embeddings); other sizes are padded on the bottom/right by border replication and the padding is cut from
the assignment maps (GroupViT instead drops the remainder pixels in its patch embedding).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_core.zero_shot.classifier import build_zero_shot_classifier, eval_mode
from ovseg_core.zero_shot.refine import REFINE_MODES, pamr
from ovseg_core.zero_shot.templates import BACKGROUND, SEGMENTATION_TEMPLATES

MAX_LOGIT_SCALE = 100.0
ASSIGNMENT_MODES = ("hard", "soft")


@dataclass(frozen=True)
class SegmenterConfig:
    """Inference settings of ``ZeroShotSegmenter``; ``to_dict()`` is recorded next to evaluation results."""

    bg_thresh: float = 0.95
    topk: int | None = 5
    window: int | None = None
    stride: int | None = None
    short_side: int | None = None
    max_long_side: int | None = 2048
    assignment: str = "hard"
    window_batch_size: int = 8
    refine: str = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_thresh <= 1.0:
            raise ValueError(f"bg_thresh must be in [0, 1] (it compares probabilities), got {self.bg_thresh}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1 or None (disabled), got {self.topk}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None (whole image), got {self.window}")
        if self.stride is not None:
            if self.window is None:
                raise ValueError("stride is only meaningful with a sliding window; set window too")
            if not 1 <= self.stride <= self.window:
                # stride > window would leave pixels that no crop covers.
                raise ValueError(f"stride must be in [1, window={self.window}], got {self.stride}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be >= 1 or None (no resize), got {self.short_side}")
        if self.max_long_side is not None and self.max_long_side < 1:
            raise ValueError(f"max_long_side must be >= 1 or None, got {self.max_long_side}")
        if self.assignment not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment must be one of {ASSIGNMENT_MODES}, got {self.assignment!r}")
        if self.window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1, got {self.window_batch_size}")
        if self.refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {REFINE_MODES}, got {self.refine!r}")

    @property
    def effective_stride(self) -> int | None:
        """Stride actually used: half the window when not given (the paper's 448/224)."""
        if self.window is None:
            return None
        return self.stride if self.stride is not None else max(1, self.window // 2)

    def to_dict(self) -> dict:
        return {**asdict(self), "stride": self.effective_stride}


def effective_logit_scale(model: nn.Module) -> Tensor:
    """The temperature used at inference: ``exp(model.logit_scale)`` clamped to 100 (CLIP/GroupViT convention)."""
    return model.logit_scale.detach().float().exp().clamp(max=MAX_LOGIT_SCALE)


def resized_size(height: int, width: int, short_side: int | None, max_long_side: int | None) -> tuple[int, int]:
    """mmseg keep-ratio resize: scale so the short side is ``short_side`` unless the long side would pass
    ``max_long_side``; sizes are rounded like mmcv (``int(x * scale + 0.5)``)."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(y1, y2, x1, x2)`` covering the image, as mmseg's ``slide_inference`` places them."""
    boxes = []
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + window, height), min(col * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


class ZeroShotSegmenter:
    """Predict a label map for one normalised image with a frozen grouping model and class names.

    Args:
        model: an OVSegmentor (or anything with the same ``encode_image``/``encode_text_strings``/``logit_scale``).
        classnames: the dataset's classes in label order; with a background class it must be index 0.
        templates: prompt templates (default: the single "a photo of a {}." used for segmentation).
        bg_thresh, topk, window, stride, short_side, max_long_side, assignment, window_batch_size:
            see ``SegmenterConfig`` and the module docstring.
        refine: "none" (the paper's protocol) or "pamr": the scores at the original size are refined along the
            image's edges (``ovseg_core.zero_shot.refine``) before the arg-max.
        refiner: the function that does it, ``(image (1, 3, H, W), scores (1, C, H, W)) -> scores``; default
            ``refine.pamr`` (a selection sweep passes a ``refine.MemoisedPamr``, same results, shared work).
        has_background: whether label 0 is a thresholded background class; ``None`` infers it from
            ``classnames[0] == "background"`` (GroupViT's rule).
        text_batch_size: prompts per text-encoder call when building the classifier.

    Labels predicted are indices into ``classnames``.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str] = SEGMENTATION_TEMPLATES,
        *,
        bg_thresh: float = 0.95,
        topk: int | None = 5,
        window: int | None = None,
        stride: int | None = None,
        short_side: int | None = None,
        max_long_side: int | None = 2048,
        assignment: str = "hard",
        has_background: bool | None = None,
        window_batch_size: int = 8,
        text_batch_size: int = 256,
        refine: str = "none",
        refiner: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.config = SegmenterConfig(
            bg_thresh=bg_thresh,
            topk=topk,
            window=window,
            stride=stride,
            short_side=short_side,
            max_long_side=max_long_side,
            assignment=assignment,
            window_batch_size=window_batch_size,
            refine=refine,
        )
        self.model = model
        self._refine_scores = pamr if refiner is None else refiner
        self.classnames = tuple(classnames)
        if has_background is None:
            has_background = bool(self.classnames) and self.classnames[0].lower() == BACKGROUND
        self.has_background = has_background
        self.foreground_classnames = self.classnames[1:] if has_background else self.classnames
        if not self.foreground_classnames:
            raise ValueError(f"no foreground classes to segment in {self.classnames}")
        self.templates = tuple(templates)
        # (K, D): background never gets a text embedding; it is decided by the threshold.
        self.text_emb = build_zero_shot_classifier(
            model, self.foreground_classnames, self.templates, batch_size=text_batch_size
        )
        self.device = self.text_emb.device

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def settings(self) -> dict:
        """JSON-able record of everything that determines the predictions (except the model)."""
        return {
            **self.config.to_dict(),
            "has_background": self.has_background,
            "templates": list(self.templates),
            "num_classes": self.num_classes,
        }

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """(3, H, W) normalised image -> (H, W) int64 labels (indices into ``classnames``), on the CPU."""
        return self.predict_logits(image).argmax(dim=0).cpu()

    @torch.no_grad()
    def predict_logits(self, image: Tensor) -> Tensor:
        """(3, H, W) normalised image -> (C, H, W) float32 class scores at the original size, on the CPU.

        Channel 0 is the background indicator (averaged over overlapping windows) when the dataset has one.
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected one (3, H, W) image, got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        cfg = self.config
        x = image.to(self.device, torch.float32)
        size = resized_size(height, width, cfg.short_side, cfg.max_long_side)
        if size != (height, width):
            # bilinear without antialias, like mmseg's cv2 resize.
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        with eval_mode(self.model):
            logits = self._slide(x) if cfg.window is not None else self._score_crops(x[None])[0]
        if size != (height, width):
            logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        if cfg.refine == "pamr":
            logits = self._refine_scores(image[None].to(logits.device), logits[None])[0]
        return logits.float().cpu()

    def _slide(self, image: Tensor) -> Tensor:
        cfg = self.config
        height, width = image.shape[-2:]
        boxes = sliding_windows(height, width, cfg.window, cfg.effective_stride)
        # Crops of one size go through the model together; sizes differ only for images smaller than the window.
        by_size: dict[tuple[int, int], list[tuple[int, int, int, int]]] = defaultdict(list)
        for box in boxes:
            by_size[(box[1] - box[0], box[3] - box[2])].append(box)
        total = torch.zeros(self.num_classes, height, width, device=image.device)
        count = torch.zeros(1, height, width, device=image.device)
        for same_size in by_size.values():
            for start in range(0, len(same_size), cfg.window_batch_size):
                chunk = same_size[start : start + cfg.window_batch_size]
                crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
                for (y1, y2, x1, x2), crop_logits in zip(chunk, self._score_crops(crops)):
                    total[:, y1:y2, x1:x2] += crop_logits
                    count[:, y1:y2, x1:x2] += 1
        if (count == 0).any():  # cannot happen with stride <= window; guards future edits of sliding_windows
            raise RuntimeError("sliding windows left pixels uncovered")
        return total / count

    def _score_crops(self, crops: Tensor) -> Tensor:
        """(N, 3, h, w) crops -> (N, C, h, w) scores; each crop gets its own top-k and background threshold."""
        num, _, height, width = crops.shape
        # The ViT needs sides that are multiples of the patch size: pad (replicating the border, so no artificial
        # region appears), then drop the padded pixels from the upsampled assignment.
        patch = int(getattr(self.model, "patch_size", 1))
        pad_h, pad_w = -height % patch, -width % patch
        if pad_h or pad_w:
            crops = F.pad(crops, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.model.encode_image(crops)
        groups = F.normalize(out.group_emb.float(), dim=-1)  # (N, G, D)
        image_emb = F.normalize(out.image_emb.float(), dim=-1)  # (N, D)
        text = self.text_emb.to(groups.device)
        scale = effective_logit_scale(self.model).to(groups.device)
        num_fg = text.shape[0]

        group_logits = scale * torch.einsum("ngd,kd->ngk", groups, text)
        unrestricted = group_logits.softmax(dim=-1)
        k = num_fg if self.config.topk is None else min(self.config.topk, num_fg)
        image_probs = (scale * image_emb @ text.T).softmax(dim=-1)  # (N, K)
        keep = torch.zeros_like(image_probs, dtype=torch.bool).scatter_(-1, image_probs.topk(k, dim=-1).indices, True)
        restricted = group_logits.masked_fill(~keep[:, None, :], -math.inf).softmax(dim=-1)
        affinity = restricted * unrestricted  # (N, G, K)

        assign = F.interpolate(
            out.assign.float(), size=(height + pad_h, width + pad_w), mode="bilinear", align_corners=False
        )[:, :, :height, :width]
        if self.config.assignment == "hard":
            # Gathering the argmax group's row (rather than multiplying by a one-hot) keeps the scores bit-exact,
            # so the most confident group is never thresholded away by rounding.
            best_group = assign.argmax(dim=1)  # (N, h, w)
            batch_index = torch.arange(num, device=assign.device)[:, None, None]
            foreground = affinity[batch_index, best_group].permute(0, 3, 1, 2)  # (N, K, h, w)
        else:
            foreground = torch.einsum("nghw,ngk->nkhw", assign, affinity)
        if not self.has_background:
            return foreground
        thresh = affinity.flatten(1).max(dim=1).values.clamp(max=self.config.bg_thresh)  # (N,)
        background = (foreground.max(dim=1).values < thresh[:, None, None]).to(foreground.dtype)
        return torch.cat([background[:, None], foreground], dim=1)
