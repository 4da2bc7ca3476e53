"""Losses on hand-made tensors: Dice, Hungarian matching, InfoNCE with validity, mask consistency."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.losses import (
    binarize_target,
    contrastive_loss,
    dice_loss,
    gather_with_grad,
    hungarian_match,
    mask_consistency_loss,
    min_max_normalize,
)


def _blocks(num: int = 4, size: int = 16) -> torch.Tensor:
    """(1, num, size, size) disjoint vertical stripes."""
    masks = torch.zeros(1, num, size, size)
    width = size // num
    for i in range(num):
        masks[0, i, :, i * width:(i + 1) * width] = 1.0
    return masks


def test_dice_identical_is_zero_and_disjoint_is_one():
    masks = _blocks()
    assert dice_loss(masks, masks).item() < 1e-6
    disjoint = torch.roll(masks, shifts=1, dims=1)  # every mask now covers another stripe
    loss = dice_loss(masks[:, :2], disjoint[:, :2]).item()
    assert loss > 0.99  # only the +1 smoothing keeps it from exactly 1


def test_dice_partial_overlap_in_between():
    a = torch.zeros(1, 1, 4, 4)
    a[..., :2] = 1
    b = torch.zeros(1, 1, 4, 4)
    b[..., 1:3] = 1
    assert math.isclose(dice_loss(a, b).item(), 1 - (2 * 4 + 1) / (8 + 8 + 1), rel_tol=1e-6)


def test_hungarian_recovers_known_permutation():
    torch.manual_seed(0)
    masks = _blocks(8, 32).repeat(3, 1, 1, 1)
    perms = [torch.randperm(8) for _ in range(3)]
    shuffled = torch.stack([masks[i, p] for i, p in enumerate(perms)])
    shuffled = shuffled + 0.01 * torch.rand_like(shuffled)
    idx_a, idx_b = hungarian_match(masks, shuffled)
    for i, p in enumerate(perms):
        matched = dict(zip(idx_a[i].tolist(), idx_b[i].tolist()))
        # shuffled[i, j] == masks[i, p[j]]  ->  mask p[j] must be matched with j
        assert all(matched[int(p[j])] == j for j in range(8))


def test_min_max_and_binarize():
    x = torch.tensor([[[[-2.0, 0.0], [2.0, 6.0]]]])
    n = min_max_normalize(x)
    assert math.isclose(n.min().item(), 0.0, abs_tol=1e-6) and math.isclose(n.max().item(), 1.0, abs_tol=1e-5)
    t = binarize_target(x, threshold=0.6)
    # sigmoid: 0.119, 0.5, 0.881, 0.9975 -> keep >= 0.6 * 0.9975 = 0.5985
    assert t.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_mask_consistency_loss_matches_permuted_masks_and_skips_invalid_rows():
    masks = _blocks(4, 16).repeat(2, 1, 1, 1)
    target_logits = (masks * 20 - 10)[:, torch.tensor([2, 0, 3, 1])]  # permuted, saturating logits
    pred_logits = (masks * 2 - 1).requires_grad_(True)
    loss = mask_consistency_loss(pred_logits, target_logits, threshold=0.6)
    assert loss.item() < 0.01
    wrong = torch.roll(masks, 1, dims=-1) * 2 - 1
    assert mask_consistency_loss(wrong, target_logits, 0.6).item() > loss.item()
    none = mask_consistency_loss(pred_logits, target_logits, 0.6, valid=torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # still attached to the graph
    only_first = mask_consistency_loss(wrong, target_logits, 0.6, valid=torch.tensor([True, False]))
    assert math.isclose(only_first.item(), mask_consistency_loss(wrong[:1], target_logits[:1], 0.6).item(),
                        rel_tol=1e-6)


def test_contrastive_loss_aligned_is_small_and_symmetric():
    emb = F.normalize(torch.eye(4, 8), dim=-1)
    assert contrastive_loss(emb, emb, torch.tensor(100.0)).item() < 1e-6
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    assert math.isclose(contrastive_loss(a, b, torch.tensor(10.0)).item(),
                        contrastive_loss(b, a, torch.tensor(10.0)).item(), rel_tol=1e-6)


def test_contrastive_loss_valid_rows_equal_subset_loss():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    valid = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(5.0)
    assert math.isclose(contrastive_loss(a, b, scale, valid).item(),
                        contrastive_loss(a[valid], b[valid], scale).item(), rel_tol=1e-5)
    a.requires_grad_(True)
    zero = contrastive_loss(a, b, scale, torch.zeros(6, dtype=torch.bool))
    assert zero.item() == 0.0
    zero.backward()
    assert a.grad is not None and a.grad.abs().sum() == 0


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def _distributed_worker(rank: int, world: int, init_file: str, a_full, b_full, valid_full, out_dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        per = a_full.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        a = a_full[sl].clone().requires_grad_(True)
        gathered = gather_with_grad(a)
        assert torch.equal(gathered.detach(), a_full)
        loss = contrastive_loss(a, b_full[sl], torch.tensor(7.0), valid_full[sl])
        loss.backward()
        out_dict[rank] = (loss.item(), bool(a.grad.abs().sum() > 0))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_contrastive_loss_two_ranks_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    valid = torch.tensor([True, True, False, True, True, False, True, False])
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), a, b, valid, out), nprocs=2, join=True)
    # every rank reports the full-batch loss over the valid rows of BOTH ranks (rank 0 holds 3, rank 1 holds 2),
    # not its own rows' mean
    scale = 7.0
    logits_a = scale * a @ b.t()
    logits_b = scale * b @ a.t()
    logits_a[:, ~valid] = float("-inf")
    logits_b[:, ~valid] = float("-inf")
    labels = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(logits_a[valid], labels[valid]) + F.cross_entropy(logits_b[valid], labels[valid]))
    for rank in range(2):
        loss, has_grad = out[rank]
        assert math.isclose(loss, expected.item(), rel_tol=1e-5) and has_grad


def test_soft_target_cross_entropy_hand_computed_and_skips_rows_without_positive():
    from ovseg_core.losses import soft_target_cross_entropy

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [5.0, -5.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    log_p = F.log_softmax(logits.detach(), dim=-1)
    # row 0: -log p0; row 1: mean of -log p1, -log p2; row 2 has no positive and is left out
    expected = 0.5 * (-log_p[0, 0] + -0.5 * (log_p[1, 1] + log_p[1, 2]))
    loss = soft_target_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    # valid=False drops a row too; nothing left -> 0 but still on the graph
    only_row1 = soft_target_cross_entropy(logits, targets, valid=torch.tensor([False, True, True]))
    assert only_row1.item() == pytest.approx((-0.5 * (log_p[1, 1] + log_p[1, 2])).item(), rel=1e-6)
    empty = soft_target_cross_entropy(logits, torch.zeros_like(targets))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="same|one shape"):
        soft_target_cross_entropy(logits, targets[:, :2])


def test_unclaimed_group_loss_flattens_only_the_groups_no_entity_claims():
    from ovseg_core.losses import unclaimed_group_loss

    # row 0: entity class 1; group 0 is most sure of it (claimed), groups 1 and 2 are not.
    # row 1: no entity -> left out entirely.
    logits = torch.tensor([[[0.0, 3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                           [[5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    log_probs = F.log_softmax(logits, dim=-1)
    loss = unclaimed_group_loss(log_probs, targets)
    kl = -log_probs[0, 1].mean() - math.log(4)  # group 2 is uniform: its KL is 0
    assert torch.allclose(loss, kl / 2)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0  # the claimed group is left alone
    assert logits.grad[1].abs().sum() == 0  # the row without an entity too
    assert logits.grad[0, 1].abs().sum() > 0
    with pytest.raises(ValueError, match="expected"):
        unclaimed_group_loss(log_probs[0], targets)


def _two_region_image():
    """(1, 3, 16, 16): grey background, a bright 8 x 8 square in the middle (patches (1..2, 1..2) of a 4 x 4 grid)."""
    img = torch.zeros(1, 3, 16, 16)
    img[:, :, 4:12, 4:12] = 2.0
    return img


def _assignment(object_group: int):
    """(1, 2, 4, 4) near-one-hot: every patch in group 0, the square's patches in `object_group`."""
    a = torch.zeros(1, 2, 4, 4)
    a[:, 0] = 1.0
    a[:, 0, 1:3, 1:3] = 1.0 - object_group
    a[:, 1, 1:3, 1:3] = float(object_group)
    return a * 0.98 + 0.01


def test_colour_affinity_loss_prefers_groups_that_follow_colour_edges():
    from ovseg_core.losses import colour_affinity_loss

    img = _two_region_image()
    following = colour_affinity_loss(_assignment(1), img, sigma=0.6)
    one_group = colour_affinity_loss(_assignment(0), img, sigma=0.6)  # the trivial grouping: pays at every edge
    undecided = colour_affinity_loss(torch.full((1, 2, 4, 4), 0.5), img, sigma=0.6)
    assert following < 0.1 < undecided < one_group
    # a flat image has no edges: one group is then as good as it gets
    flat = torch.zeros(1, 3, 16, 16)
    assert colour_affinity_loss(_assignment(0), flat, sigma=0.6) < colour_affinity_loss(_assignment(1), flat, sigma=0.6)


def test_colour_affinity_loss_pulls_similar_neighbours_together_by_gradient():
    from ovseg_core.losses import colour_affinity_loss

    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1, 1, 1] = 2.0  # one object patch leans to group 1, the other three to group 0
    logits.requires_grad_(True)
    colour_affinity_loss(logits.softmax(dim=1), _two_region_image(), sigma=0.6).backward()
    # descending the gradient raises group 1 on the square's other patches and lowers it on the background
    # patches next to the leaning one (the rest, all undecided, get no first-order push)
    step = -logits.grad[0, 1] + logits.grad[0, 0]
    assert step[1, 2] > 0 and step[2, 1] > 0 and step[2, 2] > 0
    assert step[0, 0] < 0 and step[1, 0] < 0 and step[0, 1] < 0
    assert step[3, 3] == 0


def test_colour_affinity_loss_checks_its_inputs():
    from ovseg_core.losses import colour_affinity_loss

    with pytest.raises(ValueError, match="expected"):
        colour_affinity_loss(torch.ones(2, 4, 4), _two_region_image(), sigma=0.6)
    with pytest.raises(ValueError, match="multiple"):
        colour_affinity_loss(torch.ones(1, 2, 3, 3), _two_region_image(), sigma=0.6)
    with pytest.raises(ValueError, match="sigma"):
        colour_affinity_loss(_assignment(1), _two_region_image(), sigma=0.0)
