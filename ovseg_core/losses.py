"""OVSegmentor losses: image-text InfoNCE, masked entity completion (same InfoNCE), cross-image mask consistency.

Small pure functions (no model state) so each can be tested on hand-made tensors:
- `gather_with_grad`: all_gather across ranks, keeping the gradient of the local slice (identity when
  torch.distributed is not initialised).
- `contrastive_loss`: symmetric InfoNCE against gathered negatives, with optional per-row validity.
- `global_row_mean`: the reduction every loss uses: the mean over the valid rows of ALL ranks (see below).
- `hungarian_match`, `min_max_normalize`, `binarize_target`, `dice_loss`, `mask_consistency_loss`: the stage-2
  cross-image mask loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ovseg_core.numerics import at_least_float32, fp32_island


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks along dim 0 -> (world*B, ...), differentiably.

    The backward of torch.distributed.nn's all_gather sums each slice's gradient over the ranks that used it, so
    with every rank computing the loss of its own rows against all columns and DDP averaging, the gradient equals a
    single process's on the whole global batch (a detached gather would drop the other ranks' terms). Identity
    without torch.distributed. Every rank must pass the same shape.
    """
    if not _dist_ready():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _rank() -> int:
    return dist.get_rank() if _dist_ready() else 0


def global_row_mean(row_losses: torch.Tensor) -> torch.Tensor:
    """Mean of per-row losses over the rows of ALL ranks; every rank must call it (one small all_reduce).

    A per-rank mean over each rank's own valid rows is not the global mean when ranks hold different numbers of
    valid rows (rows without an entity or without a partner drop out), and DDP averages the ranks' gradients with
    equal weights. So each rank returns W * (its row sum) / (valid rows on all ranks) for the gradient, which DDP's
    1/W average turns into the gradient of the global mean, and the global mean itself as the value (the same on
    every rank, so logs agree). Single process: the plain mean. No row anywhere: 0, still on the graph.

    Args:
        row_losses: (n,) losses of this rank's valid rows (n may be 0, and may differ between ranks).
    """
    local_sum = row_losses.sum()
    if not _dist_ready():
        return local_sum / row_losses.numel() if row_losses.numel() else 0.0 * local_sum
    total = at_least_float32(local_sum.detach())
    stats = torch.stack([total, torch.tensor(float(row_losses.numel()), device=total.device, dtype=total.dtype)])
    dist.all_reduce(stats)
    count = stats[1].clamp(min=1.0)
    scaled = local_sum * (dist.get_world_size() / count)
    return scaled + (stats[0] / count - scaled).detach().to(scaled.dtype)


def global_masked_mean(row_losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`global_row_mean` of the rows where `valid` is True, with fixed shapes and no host sync (compile-friendly).

    Invalid rows enter through `torch.where`, so neither their values nor their gradients reach the result, even
    when they are huge (their label column may be masked out). No valid row anywhere: 0, still on the graph.
    """
    local_sum = torch.where(valid, row_losses, torch.zeros_like(row_losses)).sum()
    local_count = valid.sum().to(local_sum.dtype)
    if not _dist_ready():
        return local_sum / local_count.clamp(min=1.0)
    total = at_least_float32(local_sum.detach())
    stats = torch.stack([total, local_count.to(total.dtype)])
    dist.all_reduce(stats)
    count = stats[1].clamp(min=1.0)
    scaled = local_sum * (dist.get_world_size() / count)
    return scaled + (stats[0] / count - scaled).detach().to(scaled.dtype)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised a (B, D) and b (B, D); row i of a matches row i of b.

    Negatives are gathered from all ranks. Rows with valid=False are neither anchors nor negatives (masked with
    -inf). The loss is the mean over the valid rows of all ranks (`global_row_mean`); with no valid row anywhere it
    is 0 (still attached to the graph so every rank runs the same backward).

    Args:
        a: (B, D) normalised embeddings (e.g. images).
        b: (B, D) normalised embeddings (e.g. texts).
        logit_scale: scalar multiplier (already exponentiated and clamped).
        valid: optional (B,) bool.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"contrastive_loss expects two (B, D) tensors of equal shape, got {a.shape} and {b.shape}")
    # fp32 island: under bf16 autocast the logits (scale up to 100 x cosines) and their softmax lose the small
    # differences between negatives; the embeddings are widened and the matmul runs without autocast.
    a, b = at_least_float32(a), at_least_float32(b)
    with fp32_island(a):
        return _contrastive(a, b, at_least_float32(logit_scale), valid)


def _contrastive(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                 valid: torch.Tensor | None) -> torch.Tensor:
    batch = a.shape[0]
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(batch, device=a.device) + batch * _rank()
    logits_a = logit_scale * a @ all_b.t()
    logits_b = logit_scale * b @ all_a.t()
    if valid is None:
        rows = 0.5 * (F.cross_entropy(logits_a, labels, reduction="none")
                      + F.cross_entropy(logits_b, labels, reduction="none"))
        return global_row_mean(rows)
    valid = valid.to(device=a.device, dtype=torch.bool)
    all_valid = gather_with_grad(valid.to(torch.uint8)).bool()  # uint8: bool collectives are backend-dependent
    neg_inf = torch.finfo(logits_a.dtype).min
    logits_a = logits_a.masked_fill(~all_valid[None, :], neg_inf)
    logits_b = logits_b.masked_fill(~all_valid[None, :], neg_inf)
    # Every row is scored and the invalid ones are dropped by the masked mean: no boolean indexing, so the shapes
    # do not depend on how many captions have an entity (a compiled step would recompile, and sync, every batch).
    rows = 0.5 * (F.cross_entropy(logits_a, labels, reduction="none")
                  + F.cross_entropy(logits_b, labels, reduction="none"))
    return global_masked_mean(rows, valid)


def soft_target_nll(log_probs: torch.Tensor, targets: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of (B, K) log-probabilities against multi-hot (B, K) targets spread evenly over each
    row's positives: mean over rows of -sum_k (t_k / sum t) log p_k.

    Rows without a positive (or with valid=False) are left out; the mean runs over the rows left on all ranks
    (`global_row_mean`); with no row left the loss is 0, still attached to the graph.
    """
    if log_probs.shape != targets.shape or log_probs.dim() != 2:
        raise ValueError(f"expected (B, K) scores and targets of one shape, got {log_probs.shape} and {targets.shape}")
    targets = targets.to(log_probs.dtype)
    positives = targets.sum(dim=1)
    keep = positives > 0
    if valid is not None:
        keep = keep & valid.to(device=log_probs.device, dtype=torch.bool)
    if not bool(keep.any()):
        anchor = 0.0 * log_probs.sum()
        return global_row_mean(anchor.reshape(1)[:0]) + anchor
    weights = targets[keep] / positives[keep, None]
    return global_row_mean(-(weights * log_probs[keep]).sum(dim=-1))


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against multi-hot (B, K) targets (`soft_target_nll` of their log-softmax)."""
    return soft_target_nll(F.log_softmax(logits, dim=-1), targets, valid)


def unclaimed_group_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Push the groups that no caption entity claims towards "no class": KL(uniform || p) over the classes.

    Args:
        log_probs: (B, G, V) each group's log-softmax over the V class prompts.
        targets: (B, V) multi-hot caption entities.

    A group is claimed when it is the most sure group of one of its row's entities (what the entity-prompt loss's
    group term trains). The others cover background or repeat an object, and zero-shot segmentation thresholds a
    group's best class probability to call it background: a flat distribution is what lets it. Rows without an
    entity are left out; the mean runs over the unclaimed groups of all ranks (`global_masked_mean`).
    """
    if log_probs.dim() != 3 or targets.shape != (log_probs.shape[0], log_probs.shape[2]):
        raise ValueError(f"expected (B, G, V) log-probs and (B, V) targets, got {log_probs.shape} and {targets.shape}")
    num_groups, num_classes = log_probs.shape[1], log_probs.shape[2]
    with torch.no_grad():
        best = F.one_hot(log_probs.argmax(dim=1), num_groups)  # (B, V, G): each class's most sure group
        claimed = (best * (targets > 0)[..., None]).amax(dim=1) > 0  # (B, G)
        keep = (targets > 0).any(dim=1, keepdim=True) & ~claimed
    kl_from_uniform = -log_probs.mean(dim=-1) - float(np.log(num_classes))  # (B, G), >= 0
    return global_masked_mean(kl_from_uniform.flatten(), keep.flatten())


# neighbours of a patch on its grid: right, down, down-right, down-left (each pair counted once)
_NEIGHBOUR_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _neighbour_pairs(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, C, h, w) -> for each neighbour offset, the two aligned views (B, C, h', w') of every pair's ends."""
    h, w = x.shape[-2:]
    pairs = []
    for di, dj in _NEIGHBOUR_OFFSETS:
        a = x[..., :h - di, max(0, -dj):w - max(0, dj)]
        b = x[..., di:, max(0, dj):w - max(0, -dj)]
        pairs.append((a, b))
    return pairs


def colour_affinity_loss(assign: torch.Tensor, images: torch.Tensor, sigma: float,
                         eps: float = 1e-4) -> torch.Tensor:
    """Neighbouring patches of one colour in one group, of different colours in different groups.

    A low-level grouping prior (not in the paper; after BoxInst's pairwise colour term, Tian et al. CVPR'21, with
    a second term for the edges): for every pair of 8-neighbour patches, s = sum_g p_i(g) p_j(g) is the chance
    that the assignment puts both in one group, and w = exp(-(d / sigma)^2) the pair's colour similarity (d: the
    distance of the patches' mean colours, in the units of `images`). The loss is the w-weighted mean of -log s
    plus the (1 - w)-weighted mean of -log(1 - s): similar neighbours are pulled into one group, an edge between
    them pushes them apart, so the assignment has no trivial one-group minimum.

    Args:
        assign: (B, G, h, w) soft assignment of the patches to groups (sums to 1 over G).
        images: (B, 3, H, W) the images the patches were cut from; H, W multiples of h, w.
        sigma: colour distance at which a pair counts as e^-1 similar.
        eps: clamp of s away from 0 and 1.

    Local to each rank (no gather): every pair lies inside one image.
    """
    if assign.dim() != 4 or images.dim() != 4 or assign.shape[0] != images.shape[0]:
        raise ValueError(f"expected (B, G, h, w) assignment and (B, 3, H, W) images, got {assign.shape} and "
                         f"{images.shape}")
    h, w = assign.shape[-2:]
    if images.shape[-2] % h or images.shape[-1] % w:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch grid {(h, w)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    with torch.no_grad():
        colours = F.adaptive_avg_pool2d(images.float(), (h, w))
    pull = push = pull_w = push_w = 0.0
    for (pa, pb), (ca, cb) in zip(_neighbour_pairs(assign.float()), _neighbour_pairs(colours)):
        same = (pa * pb).sum(dim=1).clamp(eps, 1.0 - eps)  # (B, h', w')
        similar = torch.exp(-((ca - cb) ** 2).sum(dim=1) / sigma ** 2)
        pull = pull + (similar * -same.log()).sum()
        push = push + ((1.0 - similar) * -(1.0 - same).log()).sum()
        pull_w, push_w = pull_w + similar.sum(), push_w + (1.0 - similar).sum()
    return pull / pull_w.clamp(min=1.0) + push / push_w.clamp(min=1.0)


@torch.no_grad()
def hungarian_match(masks_a: torch.Tensor, masks_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one matching of the G masks of a with the G masks of b, per batch row.

    Cost = L2 distance between L2-normalised flattened masks (OVSegmentor's `cost_type="L2"`), solved with
    scipy's linear_sum_assignment.

    Args:
        masks_a: (B, G, ...) masks.
        masks_b: (B, G, ...) masks.

    Returns:
        idx_a, idx_b: (B, G) long; masks_a[b, idx_a[b, j]] is matched with masks_b[b, idx_b[b, j]].
    """
    if masks_a.shape[:2] != masks_b.shape[:2]:
        raise ValueError(f"mask sets differ in batch/group dims: {masks_a.shape} vs {masks_b.shape}")
    a = F.normalize(masks_a.flatten(2).float(), dim=-1)
    b = F.normalize(masks_b.flatten(2).float(), dim=-1)
    cost = torch.cdist(a, b, p=2).cpu().numpy()
    rows, cols = zip(*(linear_sum_assignment(c) for c in cost)) if len(cost) else ((), ())
    idx_a = torch.as_tensor(np.stack(rows) if rows else np.zeros((0, a.shape[1])), dtype=torch.long)
    idx_b = torch.as_tensor(np.stack(cols) if cols else np.zeros((0, a.shape[1])), dtype=torch.long)
    return idx_a.to(masks_a.device), idx_b.to(masks_a.device)


def min_max_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale every mask (B, G, ...) to [0, 1] over its pixels (eps avoids 0/0 for a constant mask)."""
    flat = x.flatten(2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


@torch.no_grad()
def binarize_target(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Target mask: sigmoid(logits) >= threshold * (its max over pixels), as float 0/1 (B, G, ...)."""
    prob = logits.flatten(2).sigmoid()
    return (prob >= threshold * prob.max(dim=-1, keepdim=True).values).to(logits.dtype).view_as(logits)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-row Dice loss over all G masks of a row: 1 - (2|P.T| + smooth) / (|P| + |T| + smooth) -> (B,).

    As in OVSegmentor, the G masks of a row are flattened together (one Dice per image pair). The caller averages
    over rows; the release summed over the per-GPU batch and divided by G, which made the effective weight grow with
    the per-GPU batch: OVSegConfig.mask_weight = 1.6 is the release's 0.1 x 128 / 8 at its stage-2 recipe.
    """
    p, t = pred.flatten(1), target.flatten(1)
    return 1.0 - (2.0 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def mask_consistency_loss(pred_logits: torch.Tensor, target_logits: torch.Tensor, threshold: float,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-image mask loss: Hungarian-match the G predicted and target masks, then Dice.

    Args:
        pred_logits: (B, G, H, W) M1 = q_online(x) k_teacher(y)^T / sqrt(C), upsampled (may carry gradients).
        target_logits: (B, G, H, W) M2 = q_teacher(y) k_teacher(y)^T / sqrt(C), upsampled (no gradient).
        threshold: target = sigmoid(M2) >= threshold * max.
        valid: optional (B,) bool; rows with False do not contribute.

    Returns:
        scalar: mean Dice over the valid rows of all ranks (`global_row_mean`; 0, attached to the graph, when no
        row is valid).
    """
    if valid is not None:
        valid = valid.to(device=pred_logits.device, dtype=torch.bool)
        if not bool(valid.any()):
            anchor = 0.0 * pred_logits.sum().clamp(-1.0, 1.0).nan_to_num(0.0)
            return global_row_mean(anchor.reshape(1)[:0]) + anchor
        pred_logits, target_logits = pred_logits[valid], target_logits[valid]
    # fp32 island: the Dice sums run over G x H x W pixels per row, too many for bf16's 8-bit mantissa
    pred_logits, target_logits = at_least_float32(pred_logits), at_least_float32(target_logits.detach())
    idx_p, idx_t = hungarian_match(pred_logits, target_logits)
    rows = torch.arange(pred_logits.shape[0], device=pred_logits.device)[:, None]
    with fp32_island(pred_logits):
        pred = min_max_normalize(pred_logits[rows, idx_p])
        target = binarize_target(target_logits[rows, idx_t], threshold)
        return global_row_mean(dice_loss(pred, target))
