"""GroupViT image encoder as used by OVSegmentor: ViT patches + learnable group tokens, one grouping block, 2 stages.

Papers: GroupViT (Xu et al., CVPR'22, arXiv:2202.11094); OVSegmentor (Xu et al., CVPR'23, arXiv:2301.09121).

    patches (B, N, C) + pos-embed ++ T group tokens -> stage-1 ViT blocks -> GroupingBlock (T -> G groups)
    -> stage-2 ViT blocks over the G groups -> LayerNorm -> groups (B, G, C)

Blocks are timm `vision_transformer.Block`s with timm's parameter names, so a timm/DINO ViT state dict maps onto
them directly (`load_timm_vit_checkpoint`: blocks 0..d1-1 -> stage 1, d1..d1+d2-1 -> stage 2, patch embedding and
interpolated position embedding; the cls token is dropped).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ovseg_core.layers.conv_stem import conv_stem
from ovseg_core.layers.grouping import GroupingBlock, GroupingOutput

_logger = logging.getLogger(__name__)


@dataclass
class VisionFeatures:
    """Output of `GroupViT.forward_features`.

    Attributes:
        groups: (B, G, C) layer-normed group tokens (the paper's unprojected group features).
        grouping: the grouping block's output (assignment, soft assignment, q, k).
        grid: (h, w) patch grid of the input.
    """

    groups: torch.Tensor
    grouping: GroupingOutput
    grid: tuple[int, int]


class GroupViT(nn.Module):
    """Two-stage GroupViT (OVSegmentor's image encoder).

    Args:
        img_size: training image size; other sizes are accepted (position embedding is resampled).
        patch_size: patch size.
        in_chans: input channels.
        embed_dim: token width.
        depths: blocks in stage 1 and stage 2.
        num_heads: heads of every block and of the grouping cross-attention.
        mlp_ratio: MLP hidden / width.
        num_group_tokens: learnable group tokens of stage 1.
        num_groups: groups out of the grouping block.
        drop_path_rate: stochastic depth, linear over all blocks.
        patch_norm: LayerNorm after the patch embedding.
        gumbel_tau: Gumbel temperature of the hard assignment.
        assign_eps: assignment normaliser epsilon.
        eval_hard_pooling: arg-max pooling in eval mode.
        gumbel_noise: Gumbel noise on the training assignment (see AssignAttention).
        patch_embed: "linear" (ViT: one linear map per patch) or "conv" (`conv_stem`: 3x3 stride-2 convolutions
            down to the same patch grid; for models trained from scratch).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depths: tuple[int, int] = (6, 6), num_heads: int = 6, mlp_ratio: float = 4.0,
                 num_group_tokens: int = 64, num_groups: int = 8, drop_path_rate: float = 0.0,
                 patch_norm: bool = True, gumbel_tau: float = 1.0, assign_eps: float = 1.0,
                 eval_hard_pooling: bool = True, gumbel_noise: bool = True, patch_embed: str = "linear") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.depths = tuple(depths)
        self.num_groups = num_groups
        # strict_img_size=False: zero-shot segmentation runs sliding windows larger than the training size.
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=nn.LayerNorm if patch_norm else None,
                                      strict_img_size=False)
        if patch_embed == "conv":  # same grid, tokens and norm; only the projection changes
            self.patch_embed.proj = conv_stem(in_chans, embed_dim, patch_size)
        elif patch_embed != "linear":
            raise ValueError(f"patch_embed must be 'linear' or 'conv', got {patch_embed!r}")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks1 = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depths[0]))
        self.grouping = GroupingBlock(embed_dim, num_heads, num_group_tokens, num_groups, gumbel_tau=gumbel_tau,
                                      assign_eps=assign_eps, eval_hard=eval_hard_pooling,
                                      gumbel_noise=gumbel_noise)
        self.blocks2 = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[depths[0] + i])
            for i in range(depths[1]))
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.group_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), old_size=list(self.grid_size),
                                      num_prefix_tokens=0)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> patch tokens with position embedding (B, N, C) and the grid (h, w)."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        return self.patch_embed(images) + self._pos_embed(grid), grid

    def forward_grouping(self, images: torch.Tensor) -> tuple[GroupingOutput, tuple[int, int]]:
        """Stage 1 + grouping block only (all the EMA teacher needs for the mask loss)."""
        x, grid = self.embed_patches(images)
        num_patches = x.shape[1]
        x = torch.cat([x, self.group_token.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks1:
            x = blk(x)
        return self.grouping(x[:, :num_patches], x[:, num_patches:]), grid

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        grouping, grid = self.forward_grouping(images)
        x = grouping.groups
        for blk in self.blocks2:
            x = blk(x)
        return VisionFeatures(groups=self.norm(x), grouping=grouping, grid=grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image feature (B, C): the mean of the normalised groups."""
        return self.forward_features(images).groups.mean(dim=1)


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    # DINO releases hold the bare state dict; training checkpoints nest it (and may prefix DDP/backbone names).
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "teacher", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint does not contain a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.", "visual."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_timm_vit_checkpoint(model: GroupViT, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise `model` from a LOCAL timm/DINO ViT state dict file (never downloads).

    Blocks 0..d1-1 go to stage 1 and d1..d1+d2-1 to stage 2; the patch embedding is copied and the position
    embedding (cls position dropped) is resampled to the model's grid; the final `norm` is copied when present.
    Group tokens, the grouping block and anything without a counterpart keep their initialisation.

    Returns:
        {"loaded": [...our keys...], "missing": [...our keys not in the checkpoint...],
         "unused": [...checkpoint keys not used...]}
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"visual_init checkpoint not found: {path} (only local files are supported)")
    report = load_timm_vit_state(model, torch.load(path, map_location="cpu", weights_only=True))
    _logger.info("visual init from %s: %d tensors loaded, %d kept their init, %d checkpoint tensors unused",
                 path, len(report["loaded"]), len(report["missing"]), len(report["unused"]))
    return report


def load_timm_vit_state(model: GroupViT, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """`load_timm_vit_checkpoint` on a state dict already in memory (a timm model's, or a file's)."""
    src = _unwrap_state_dict(state)
    d1, d2 = model.depths
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, v in src.items():
        target = None
        if k.startswith("blocks."):
            idx_str, rest = k[len("blocks."):].split(".", 1)
            idx = int(idx_str)
            if idx < d1:
                target = f"blocks1.{idx}.{rest}"
            elif idx < d1 + d2:
                target = f"blocks2.{idx - d1}.{rest}"
        elif k.startswith(("patch_embed.proj.", "norm.")):
            target = k
        elif k == "pos_embed":
            n_src = v.shape[1]
            side = round((n_src - 1) ** 0.5)
            prefix = 1 if side * side == n_src - 1 else 0  # timm/DINO ViTs keep the cls position first
            side = round((n_src - prefix) ** 0.5)
            v = resample_abs_pos_embed(v.float(), list(model.grid_size), old_size=[side, side],
                                       num_prefix_tokens=prefix)
            if prefix:
                v = v[:, prefix:]
            target = "pos_embed"
        if target is not None:
            mapped[target] = v
            used.add(k)
    own = model.state_dict()
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        raise ValueError("checkpoint does not match the model dims: " + "; ".join(bad_shapes[:5]))
    unknown = sorted(k for k in mapped if k not in own)
    if unknown:
        raise ValueError(f"checkpoint keys map to no model parameter: {unknown[:5]}")
    model.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "missing": sorted(k for k in own if k not in mapped),
            "unused": sorted(k for k in src if k not in used)}
