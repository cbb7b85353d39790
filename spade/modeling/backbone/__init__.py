"""The diffusion UNet backbone: model loading, implicit text encoder, LoRA, feature extractor."""

from .diffusion_backbone import (  # registers "build_diffusion_backbone" in BACKBONE_REGISTRY
    DiffusionBackbone,
    build_diffusion_backbone,
    clip_dense_features,
)
from .implicit_text import ImplicitTextAdapter, ImplicitTextEncoder, build_implicit_text_encoder
from .loading import (
    ClipParts,
    DiffusionParts,
    build_clip,
    build_diffusion_parts,
    check_text_conditioning,
    clip_preprocess,
    encode_text_tokens,
    tokenize,
)
from .lora import (
    apply_lora,
    has_lora,
    load_trainable_state_dict,
    lora_disabled,
    merge_lora,
    save_trainable_state_dict,
    trainable_state_dict,
)

__all__ = [
    "ClipParts",
    "DiffusionBackbone",
    "DiffusionParts",
    "ImplicitTextAdapter",
    "ImplicitTextEncoder",
    "apply_lora",
    "build_clip",
    "build_diffusion_backbone",
    "build_diffusion_parts",
    "build_implicit_text_encoder",
    "check_text_conditioning",
    "clip_dense_features",
    "clip_preprocess",
    "encode_text_tokens",
    "has_lora",
    "load_trainable_state_dict",
    "lora_disabled",
    "merge_lora",
    "save_trainable_state_dict",
    "tokenize",
    "trainable_state_dict",
]
