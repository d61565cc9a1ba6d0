"""Architecture of a ``clip.model.CLIP``: build one from constructor kwargs, read the kwargs
back from a model or a state dict, and describe them in words (for error messages and cards)."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch

with warnings.catch_warnings():  # openai-clip imports pkg_resources, which warns on import
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    from clip.model import CLIP, VisionTransformer

__all__ = ["build_arch", "arch_of", "describe_arch", "arch_from_state_dict"]


def build_arch(arch: Mapping[str, Any], seed: int) -> CLIP:
    with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG stream is left untouched
        torch.manual_seed(int(seed))
        return CLIP(**arch)



def arch_of(model: CLIP) -> dict[str, Any]:
    """The ``clip.model.CLIP`` constructor kwargs of ``model`` (read from its modules)."""
    v = model.visual
    arch: dict[str, Any] = dict(
        embed_dim=int(model.text_projection.shape[1]),
        context_length=int(model.context_length),
        vocab_size=int(model.token_embedding.num_embeddings),
        transformer_width=int(model.ln_final.weight.shape[0]),
        transformer_heads=int(model.transformer.resblocks[0].attn.num_heads),
        transformer_layers=int(model.transformer.layers),
    )
    if isinstance(v, VisionTransformer):
        patch = int(v.conv1.kernel_size[0])
        grid = round((v.positional_embedding.shape[0] - 1) ** 0.5)
        arch.update(image_resolution=patch * grid, vision_layers=int(v.transformer.layers),
                    vision_width=int(v.conv1.out_channels), vision_patch_size=patch)
    else:
        grid = round((v.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        arch.update(image_resolution=32 * grid,
                    vision_layers=tuple(len(getattr(v, f"layer{i}")) for i in (1, 2, 3, 4)),
                    vision_width=int(v.layer1[0].conv1.out_channels), vision_patch_size=None)
    return arch


def describe_arch(arch: Mapping[str, Any]) -> str:
    if isinstance(arch["vision_layers"], (tuple, list)):
        vis = f"ResNet layers {tuple(arch['vision_layers'])} width {arch['vision_width']}"
    else:
        vis = f"ViT patch {arch['vision_patch_size']} width {arch['vision_width']} layers {arch['vision_layers']}"
    return f"{vis}, embed dim {arch['embed_dim']}, text width {arch['transformer_width']}"


def arch_from_state_dict(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Human description of the architecture a CLIP state dict holds (for error messages)."""
    try:
        if "visual.proj" in sd:
            w = sd["visual.conv1.weight"]
            layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            vis = f"ViT patch {w.shape[-1]} width {w.shape[0]} layers {layers}"
        else:
            counts = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
            vis = f"ResNet layers {counts} width {sd['visual.layer1.0.conv1.weight'].shape[0]}"
        return f"{vis}, embed dim {sd['text_projection'].shape[1]}, text width {sd['ln_final.weight'].shape[0]}"
    except Exception:  # noqa: BLE001 - only a hint
        return None


