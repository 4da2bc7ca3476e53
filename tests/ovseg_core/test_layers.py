"""Layers: Gumbel/straight-through assignment, grouping block, cross-attention masking, projection head."""

import pytest
import torch

from ovseg_core.layers import (
    AssignAttention,
    CrossAttention,
    GroupingBlock,
    ProjectionHead,
    TokenMlp,
    conv_stem,
    gumbel_softmax,
    straight_through_one_hot,
)


def test_gumbel_softmax_hard_is_one_hot_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    y = gumbel_softmax(logits, tau=1.0, hard=True, dim=1)
    assert torch.equal(y.detach().sum(1), torch.ones(2, 7))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    (y * torch.randn_like(y)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_straight_through_one_hot_picks_argmax():
    soft = torch.tensor([[0.1, 0.7, 0.2]])
    assert straight_through_one_hot(soft, dim=1).tolist() == [[0.0, 1.0, 0.0]]


def test_assign_attention_soft_in_eval_hard_in_train():
    torch.manual_seed(0)
    attn = AssignAttention(16)
    groups, patches = torch.randn(2, 4, 16), torch.randn(2, 9, 16)
    attn.eval()
    out, info = attn(groups, patches)
    assert out.shape == (2, 4, 16) and info.q.shape == (2, 4, 16) and info.k.shape == (2, 9, 16)
    assert torch.allclose(info.soft_assign.sum(1), torch.ones(2, 9), atol=1e-6)
    assert set(info.assign.unique().tolist()) <= {0.0, 1.0}  # eval pooling: deterministic arg-max
    attn.train()
    _, info = attn(groups, patches)
    assert torch.equal(info.assign.detach().sum(1), torch.ones(2, 9))
    info.assign.mul(torch.randn_like(info.assign)).sum().backward()
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0


def test_assign_attention_soft_eval_pooling_option():
    attn = AssignAttention(8, eval_hard=False).eval()
    _, info = attn(torch.randn(1, 3, 8), torch.randn(1, 5, 8))
    assert torch.equal(info.assign, info.soft_assign)


def test_assign_attention_without_gumbel_noise_trains_on_the_clean_arg_max():
    torch.manual_seed(0)
    groups, patches = torch.randn(2, 4, 16), torch.randn(2, 30, 16)
    clean = AssignAttention(16, gumbel_noise=False).train()
    noisy = AssignAttention(16).train()
    noisy.load_state_dict(clean.state_dict())
    _, info = clean(groups, patches)
    arg_max = torch.zeros_like(info.soft_assign).scatter_(1, info.soft_assign.argmax(1, keepdim=True), 1.0)
    assert torch.equal(info.assign.detach(), arg_max)  # every call, no noise
    info.assign.mul(torch.randn_like(info.assign)).sum().backward()
    assert clean.q_proj.weight.grad.abs().sum() > 0  # straight-through gradients still reach the assignment
    draws = [noisy(groups, patches)[1].assign.detach() for _ in range(5)]
    assert any(not torch.equal(d, arg_max) for d in draws)  # the paper's default keeps the Gumbel noise


def test_grouping_block_shapes_and_group_count():
    block = GroupingBlock(dim=32, num_heads=4, num_group_tokens=16, num_output_groups=4).eval()
    info = block(torch.randn(3, 25, 32), torch.randn(3, 16, 32))
    assert info.groups.shape == (3, 4, 32)
    assert info.assign.shape == info.soft_assign.shape == (3, 4, 25)


def test_cross_attention_ignores_padded_keys():
    torch.manual_seed(0)
    attn = CrossAttention(16, num_heads=4).eval()
    query, key = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    changed = key.clone()
    changed[0, 4:] = 100.0
    changed[1, 5:] = -7.0
    assert torch.allclose(attn(query, key, mask), attn(query, changed, mask), atol=1e-6)
    assert not torch.allclose(attn(query, key), attn(query, changed), atol=1e-3)


def test_projection_head_2d_and_3d():
    head = ProjectionHead(8, 16, 4)
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert head(torch.randn(5, 3, 8)).shape == (5, 3, 4)
    with pytest.raises(ValueError):
        head(torch.randn(8))


def test_token_mlp_maps_token_count():
    assert TokenMlp(64, 16, 8)(torch.randn(2, 64, 12)).shape == (2, 8, 12)


def test_conv_stem_reaches_the_patch_grid_and_sees_past_its_patch():
    stem = conv_stem(3, 96, 4).eval()
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [24, 48, 96]
    image = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = stem(image)
        assert out.shape == (2, 96, 16, 12)
        # a linear patch embedding's token (5, 5) reads pixels 20..23 only; the stem's reads 17..23
        changed = image.clone()
        changed[:, :, 19, 19] += 5.0  # last pixel of patch (4, 4)
        delta = (stem(changed) - out).abs().sum(dim=1)[0]
    assert delta[4, 4] > 0 and delta[5, 5] > 0 and delta[0, 0] == 0 and delta[6, 6] == 0
    assert len([m for m in conv_stem(3, 64, 8) if isinstance(m, torch.nn.Conv2d)]) == 4
    for patch, width in ((6, 96), (1, 96), (4, 90)):
        with pytest.raises(ValueError, match="convolutional stem"):
            conv_stem(3, width, patch)
