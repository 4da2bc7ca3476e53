"""The image encoder's init (TrainConfig.visual_init): DINO ViT-B/16 for the `paper` recipe, as in the release.

A spec is a local state-dict file, or a timm model name (`vit_base_patch16_224.dino`) whose pretrained weights timm
fetches on a machine with internet (or finds in the Hugging Face cache; with HF_HUB_OFFLINE=1 only the cache).
The mapping is the release's (`group_vit.load_timm_vit_state`): blocks 0..5 -> stage 1, 6..11 -> stage 2, the patch
embedding, and the position embedding without its cls slot (resampled to the model's grid); the final norm comes
along when present. The load report ({"source", "loaded", "new", "unused", "expected_missing"}) is saved with the
run; a load that leaves any tensor of the expected set (`expected_keys`) at its random init is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovseg_core.models.group_vit import load_timm_vit_state

DINO_VIT_B16 = "vit_base_patch16_224.dino"
VISUAL_INIT_REPORT = "visual_init.json"


class VisualInitUnavailable(RuntimeError):
    """The named init cannot be read here (no such file; a timm name neither cached nor downloadable)."""


def is_file_spec(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(spec).exists()


def unavailable_message(spec: str, why: str) -> str:
    return (f"visual init {spec!r} is not reachable ({why}): pass --visual-init FILE (a local DINO ViT state dict), "
            f"a timm name on a machine with internet, or --visual-init none to train from scratch (recorded)")


def load_init_state(spec: str) -> dict[str, torch.Tensor]:
    """The state dict named by `spec` (file or timm name); VisualInitUnavailable (one line) when unreachable."""
    if is_file_spec(spec):
        if not Path(spec).is_file():
            raise VisualInitUnavailable(unavailable_message(spec, "no such file"))
        return torch.load(spec, map_location="cpu", weights_only=True)
    import timm

    if not timm.is_model(spec.split(".")[0]):
        raise VisualInitUnavailable(unavailable_message(spec, "not a file and not a timm model name"))
    try:
        return timm.create_model(spec, pretrained=True, num_classes=0).state_dict()
    except Exception as exc:
        first_sentence = " ".join(str(exc).split()).split(". ")[0][:120]  # one line
        why = f"{type(exc).__name__}: {first_sentence}"
        raise VisualInitUnavailable(unavailable_message(spec, why)) from exc


def expected_keys(visual: nn.Module) -> list[str]:
    """The release's mapped set in our names: every tensor of blocks1/blocks2, the patch projection, pos_embed."""
    prefixes = ("blocks1.", "blocks2.", "patch_embed.proj.")
    return sorted(k for k in visual.state_dict() if k.startswith(prefixes) or k == "pos_embed")


def apply_visual_init(visual: nn.Module, spec: str, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load `spec` (or its already loaded `state`) into the GroupViT `visual`; returns the load report; raises
    ValueError (one line) when any expected tensor was not loaded (fewer blocks, another width, a non-ViT file)."""
    report = load_timm_vit_state(visual, load_init_state(spec) if state is None else state)
    missing = sorted(set(expected_keys(visual)) - set(report["loaded"]))
    out = {"source": spec, "loaded": report["loaded"], "new": report["missing"], "unused": report["unused"],
           "expected": len(expected_keys(visual)), "expected_missing": missing}
    if missing:
        raise ValueError(f"visual init {spec!r} loaded {len(report['loaded'])} tensors but not {len(missing)} of the "
                         f"{out['expected']} expected (e.g. {missing[0]}): refusing to train from a partial init")
    return out


def save_dino_shaped_checkpoint(path: str | os.PathLike, *, embed_dim: int, depth: int, num_heads: int,
                                patch_size: int, img_size: int, seed: int = 0) -> Path:
    """A random-weight timm ViT with DINO ViT-B/16's layout (timm names, cls token, pos_embed with the cls slot) at
    a chosen size, saved as a state dict: the offline stand-in for the real init in tests and demos."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0, embed_dim=embed_dim,
                            depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size)
    torch.save(vit.state_dict(), path)
    return Path(path)
