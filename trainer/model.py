"""Building the timm ViT for a dataset and making it sparse."""
from __future__ import annotations

from collections.abc import Callable

import timm
import torch

from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.pretrained import load_pretrained
from trainer.sparse_vit import SparseVisionTransformer, sparsify

# What a person who named something else is pointed to: models sparsify accepts, and how to list them.
VIT_EXAMPLES = "deit_tiny_patch16_224, deit_small_patch16_224, vit_small_patch16_224"
LIST_VITS = "python -c \"import timm; print(timm.list_models(module=['vision_transformer', 'deit']))\""


def patch_size_of(config: TrainConfig, img_size: int) -> int:
    """The patch side a run uses: --patch-size, else 16 from 128 px (ViT's, 196 patches at 224), 4 from
    16 px (64 patches at 32), else 2."""
    return config.patch_size or (16 if img_size >= 128 else 4 if img_size >= 16 else 2)


def model_kwargs(config: TrainConfig, img_size: int, num_classes: int) -> dict:
    """The overrides handed to ``timm.create_model`` (also what a user needs to rebuild it)."""
    kwargs = {"img_size": img_size, "num_classes": num_classes, "drop_path_rate": config.drop_path,
              "patch_size": patch_size_of(config, img_size)}
    if config.patch_drop:  # timm builds its PatchDropout only when asked: default models keep their modules
        kwargs["patch_drop_rate"] = config.patch_drop
    if config.curriculum_side:  # the position embedding interpolated to each epoch's grid (trainer/curriculum.py)
        kwargs["dynamic_img_size"] = True
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs


def check_model(config: TrainConfig, img_size: int, num_classes: int) -> None:
    """Refuse, in one line naming the setting, a model onion cannot train: a name timm does not know,
    a model that is not a timm VisionTransformer that :func:`sparsify` accepts, shape settings the
    model cannot be built with, or a patch that does not divide the input (timm would silently drop
    the pixels past the last whole patch). The model is built on the meta device: no memory, ~0.1 s."""
    patch = patch_size_of(config, img_size)
    if img_size % patch:
        size_from = f"--img-size {img_size}" if config.img_size else f"the dataset's {img_size} px images"
        patch_from = f"--patch-size {patch}" if config.patch_size else f"the default patch size {patch}"
        divisors = [p for p in range(2, min(img_size // 2, 32) + 1) if img_size % p == 0][:4]
        sizes = [size for size in (img_size // patch * patch, (img_size // patch + 1) * patch) if size]
        fix = (f"a --patch-size that divides {img_size} ({', '.join(map(str, divisors))}) or " if divisors else "")
        fix += f"an --img-size that is a multiple of {patch} ({' or '.join(map(str, sizes))})"
        raise RunError(f"{patch_from} does not divide {size_from}: {img_size} is not a multiple of {patch}, so the "
                       f"pixels past the last whole patch would be dropped; choose {fix}")
    kwargs = model_kwargs(config, img_size, num_classes)
    try:
        vit = vit_on_meta(config.model, **kwargs)
    except (AssertionError, ValueError) as error:
        settings = ", ".join(f"{name}={kwargs[name]}" for name in ("img_size", "patch_size", "depth", "embed_dim",
                                                                    "num_heads") if name in kwargs)
        raise RunError(f"--model {config.model} cannot be built with {settings}: "
                       f"{str(error) or 'timm refuses them (' + type(error).__name__ + ')'}") from error
    depth = len(vit.blocks) if hasattr(vit, "blocks") else 0
    outside = [block for block in config.token_blocks or () if not 0 <= block < depth]
    if depth and outside:
        raise RunError(f"--token-blocks {','.join(map(str, config.token_blocks))}: block "
                       f"{','.join(map(str, outside))} is outside the model's {depth} blocks (0 to {depth - 1})")
    try:
        sparsify(vit, token_blocks=config.token_blocks, fuse_token=config.fuse_token, attn_mode=config.attn_mode,
                 attn_block=config.attn_block)
    except TypeError as error:
        raise RunError(f"--model {config.model} is a timm {type(vit).__name__}, which onion cannot make sparse "
                       f"({error}); use a standard ViT or DeiT such as {VIT_EXAMPLES} "
                       f"(list them: {LIST_VITS})") from error
    except ValueError as error:
        raise RunError(f"--model {config.model}: {error}") from error


def vit_on_meta(name: str, **kwargs: object) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` on the meta device (no memory, ~0.1 s), or a one-line refusal of a
    name timm does not know or a model that takes no image and patch size (not a ViT)."""
    if not timm.is_model(name):
        raise RunError(f"--model {name}: timm has no model of that name; onion trains timm VisionTransformer "
                       f"models such as {VIT_EXAMPLES} (list them: {LIST_VITS})")
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as error:  # an architecture without img_size / patch_size: not a ViT
        raise RunError(f"--model {name} is not a timm VisionTransformer ({error}); onion trains models "
                       f"such as {VIT_EXAMPLES} (list them: {LIST_VITS})") from error
    if not hasattr(vit, "patch_embed"):
        raise RunError(f"--model {name} is not a timm VisionTransformer (a timm {type(vit).__name__}); onion trains "
                       f"models such as {VIT_EXAMPLES} (list them: {LIST_VITS})")
    return vit


def published_settings(name: str) -> dict:
    """What a timm model named with ``--model`` is built with unless given otherwise: its own input side and
    patch size, and the input normalisation of its pretrained config (the statistics its weights expect)."""
    vit = vit_on_meta(name)
    data = timm.data.resolve_model_data_config(vit)
    patch = vit.patch_embed.patch_size
    return {"img_size": int(data["input_size"][-1]), "patch_size": int(patch[0] if isinstance(patch, tuple) else patch),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]]}


def with_published_settings(values: dict) -> dict:
    """The settings a user gave, with a named model's published ones filling what was not given."""
    if not values.get("model"):
        return values
    return {**published_settings(values["model"]), **values}


def build_model(config: TrainConfig, img_size: int, num_classes: int, *, load_pretrained_weights: bool = True,
                say: Callable[[str], None] = print) -> SparseVisionTransformer:
    """The sparse ViT of a run; ``--pretrained`` weights loaded unless a checkpoint is about to replace them."""
    check_model(config, img_size, num_classes)
    vit = timm.create_model(config.model, pretrained=False, **model_kwargs(config, img_size, num_classes))
    if config.pretrained and load_pretrained_weights:
        load_pretrained(vit, config.pretrained, say)
    return sparsify(vit, token_keep=1.0, token_blocks=config.token_blocks, attn_keep=1.0,
                    fuse_token=config.fuse_token, attn_mode=config.attn_mode, attn_block=config.attn_block,
                    token_merge=config.token_merge)
