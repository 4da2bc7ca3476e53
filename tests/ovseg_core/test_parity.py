"""Reference-parity fixes (issue 11): no patch norm on the DINO-initialised presets, the mask-loss weight of the
release, checkpoints that load without their visual_init file, and Gumbel noise drawn in float32 under bf16."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import ovseg_core
from ovseg_core import create_model
from ovseg_core.layers.grouping import gumbel_noise, gumbel_softmax
from ovseg_core.models.checkpoint import load_model_from_checkpoint, save_checkpoint
from ovseg_core.models.group_vit import GroupViT, load_timm_vit_checkpoint


@pytest.mark.parametrize("name", ["vit_s", "vit_b"])
def test_dino_presets_have_no_patch_norm(name):
    assert ovseg_core.get_model_config(name).patch_norm is False


def test_patch_tokens_equal_the_dino_vits_when_patch_norm_is_off(tmp_path):
    # A DINO/timm ViT has no norm after the patch embedding: with patch_norm=False the loaded encoder feeds its blocks
    # exactly the tokens the ViT's own blocks saw (with a norm, the tokens differ and the norm has no weights).
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    path = tmp_path / "dino_like.pth"
    torch.save(vit.state_dict(), path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    for patch_norm, should_match in ((False, True), (True, False)):
        ours = GroupViT(img_size=32, patch_size=8, embed_dim=64, depths=(1, 1), num_heads=4, num_group_tokens=8,
                        num_groups=2, patch_norm=patch_norm)
        load_timm_vit_checkpoint(ours, path)
        with torch.no_grad():
            tokens, _ = ours.embed_patches(images)
        assert torch.allclose(tokens, expected, atol=1e-5) is should_match


def test_mask_weight_is_the_releases_effective_weight_on_the_mean_dice():
    # release: 0.1 * (sum of Dice over 128 rows per GPU) / 8 groups == 1.6 * mean Dice
    assert ovseg_core.get_model_config("vit_b").mask_weight == pytest.approx(0.1 * 128 / 8)


def test_checkpoint_trained_with_visual_init_loads_without_the_init_file(tmp_path):
    cfg = ovseg_core.get_model_config("tiny")
    vit = VisionTransformer(img_size=64, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=sum(cfg.depths),
                            num_heads=cfg.num_heads, num_classes=0)
    init = tmp_path / "dino.pth"
    torch.save(vit.state_dict(), init)
    torch.manual_seed(0)
    model = create_model("tiny", text_pretrained=False, visual_init=str(init))
    with torch.no_grad():
        model.visual.group_token.add_(1.0)  # "trained" weights that the init would not reproduce
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model=model, step=3)
    init.unlink()
    loaded = load_model_from_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError):  # the init itself still insists on its file
        create_model("tiny", text_pretrained=False, visual_init=str(init))


def test_gumbel_noise_is_float32_with_its_full_tail():
    g = torch.Generator().manual_seed(0)
    noise = gumbel_noise((1_000_000,), torch.device("cpu"), generator=g)
    assert noise.dtype == torch.float32
    # P(noise > 7) = 1 - exp(-exp(-7)) ~ 9e-4: ~900 draws here; bf16 uniforms cap the noise near 5.5
    assert noise.max().item() > 7.0
    assert noise.unique().numel() > 900_000  # bf16 would give a few hundred distinct values


def test_hard_gumbel_on_bf16_logits_picks_groups_uniformly():
    # Equal logits: every group must win 1/G of the patches. Noise drawn in bf16 ties often and a tie goes to the
    # lowest index, so the share fell with the group index (0.1272 for group 0 down to 0.1227 for group 7, a slope
    # of -6e-4 per group); float32 noise leaves only sampling noise (slope s.d. ~8e-5 at this size).
    groups, patches = 8, 400_000
    logits = torch.zeros(1, groups, patches, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(0)
    y = gumbel_softmax(logits, hard=True, dim=1)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float().sum(dim=1), torch.ones(1, patches))
    share = y.float().sum(dim=2)[0] / patches
    index = torch.arange(groups, dtype=torch.float32)
    slope = ((index - index.mean()) * (share - share.mean())).sum() / ((index - index.mean()) ** 2).sum()
    assert abs(slope.item()) < 3e-4
    assert (share - 1 / groups).abs().max().item() < 0.003
    (y.float() * index[None, :, None]).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # straight-through gradient


def test_soft_gumbel_keeps_float64_precision():
    # The noise is float32, but float64 logits must not be narrowed: the DDP parity test runs in float64, and a
    # float32 softmax inside it was 1e-3 off where float64 sums agree to 1e-12.
    logits = torch.randn(2, 4, 50, dtype=torch.float64) * 1e-9  # differences float32 cannot hold around 1
    y = gumbel_softmax(logits + 1.0, hard=False, dim=1, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float64
    ref = (logits + 1.0 + gumbel_noise(logits.shape, logits.device, torch.Generator().manual_seed(0))).softmax(1)
    assert torch.allclose(y, ref, rtol=0, atol=1e-15)


def test_at_least_float32_widens_half_and_keeps_double():
    from ovseg_core.numerics import at_least_float32

    assert at_least_float32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_float32(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    assert at_least_float32(torch.ones(2)).dtype == torch.float32
    assert at_least_float32(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_mask_weight_config_override_still_validated():
    cfg = ovseg_core.get_model_config("tiny")
    with pytest.raises(ValueError):
        dataclasses.replace(cfg, mask_weight=-1.0)
