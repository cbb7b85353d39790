"""LoRA on the UNet's cross-attention (attn2) projections; save / load of SPADE's trainable parts.

Stage 1 trains only LoRA (delta W = B x D of rank r on attn2 to_q / to_k / to_v / to_out.0) and the
implicit text encoder's MLP adapter; the teacher is the same UNet with its adapters disabled
(:func:`lora_disabled`), so one UNet sits in memory. LoRA is injected through diffusers' PEFT
integration (``unet.add_adapter(LoraConfig(...))``).

With ``LORA.ENABLED`` False (the "no LoRA" ablation: full fine-tuning) no adapter is injected;
instead every UNet parameter becomes trainable and the whole UNet is saved in place of the LoRA
factors (SD 1.5: ~860M parameters, ~3.4 GB in float32; AdamW adds two moments, so budget about
14 GB of GPU memory for weights, gradients and optimizer state before activations).

The trainable parts travel as ONE safetensors file: keys ``lora.<peft key>`` (or
``unet.<parameter name>`` for the ablation) and ``adapter.<key>``, with string metadata (format,
rank, alpha, target modules, K, dims) that :func:`load_trainable_state_dict` checks against the
model it loads into.
"""

import contextlib
import json
import os
import tempfile
from typing import Dict, Iterator, List, Optional

import torch
from detectron2.config import CfgNode
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

from .implicit_text import ImplicitTextEncoder

__all__ = [
    "apply_lora",
    "has_lora",
    "lora_disabled",
    "merge_lora",
    "lora_layer_names",
    "trainable_state_dict",
    "trainable_metadata",
    "save_trainable_state_dict",
    "load_trainable_state_dict",
]

FORMAT = "spade-trainable-v1"
_ADAPTER_NAME = "default"
_CROSS_ATTENTION = "attn2"


def apply_lora(unet: torch.nn.Module, lora_cfg: CfgNode, seed: int = 0) -> List[str]:
    """Make the UNet's cross-attention LoRA trainable, everything else frozen (or, with
    ``ENABLED`` False, the whole UNet trainable).

    Args:
        unet: a diffusers UNet2DConditionModel (frozen by the loader).
        lora_cfg: ``cfg.MODEL.SPADE.LORA`` (ENABLED, RANK, ALPHA, TARGET_MODULES, INIT_WEIGHTS).
        seed: seed of the random LoRA init when ``INIT_WEIGHTS`` is False.
    Returns:
        names of the UNet modules that were adapted (LoRA), or of every UNet module (full
        fine-tuning).
    Raises:
        ValueError if a target matches no module or a module outside ``attn2`` (self-attention
        attn1 and the rest of the UNet stay untouched, as in the paper).
    """
    targets = [str(t) for t in lora_cfg.TARGET_MODULES]
    if not targets:
        raise ValueError("MODEL.SPADE.LORA.TARGET_MODULES is empty")
    unet.requires_grad_(False)
    names = _matching_module_names(unet, targets)
    if not names:
        raise ValueError(f"MODEL.SPADE.LORA.TARGET_MODULES={targets} match no UNet module")
    outside = [n for n in names if _CROSS_ATTENTION not in n.split(".")]
    if outside:
        raise ValueError(
            f"MODEL.SPADE.LORA.TARGET_MODULES={targets} match modules outside cross-attention "
            f"(attn2): {outside[:3]}"
        )
    if not lora_cfg.ENABLED:  # "no LoRA": the whole UNet is fine-tuned
        unet.requires_grad_(True)
        return [n for n, _ in unet.named_modules() if n]
    if has_lora(unet):
        raise ValueError("the UNet already carries a LoRA adapter")
    config = LoraConfig(
        r=int(lora_cfg.RANK),
        lora_alpha=float(lora_cfg.ALPHA),
        target_modules=targets,
        init_lora_weights=bool(lora_cfg.INIT_WEIGHTS),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=_ADAPTER_NAME)
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return lora_layer_names(unet)


def has_lora(unet: torch.nn.Module) -> bool:
    """Whether a PEFT adapter is injected in ``unet``."""
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def lora_layer_names(unet: torch.nn.Module) -> List[str]:
    """Names of the UNet modules carrying LoRA (e.g. ``...attn2.to_q``)."""
    return [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``unet`` as the frozen teacher: LoRA adapters off inside the block.

    ``requires_grad`` flags of the LoRA weights are restored on exit (PEFT's enable call would
    otherwise mark them trainable). A UNet without LoRA is yielded unchanged.
    """
    if not has_lora(unet):
        yield unet
        return
    flags = {n: p.requires_grad for n, p in unet.named_parameters() if ".lora_" in n}
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
        for name, param in unet.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])


def merge_lora(unet: torch.nn.Module) -> None:
    """Fold LoRA into the base weights (W <- W + alpha/r * B x D) for faster inference."""
    if not has_lora(unet):
        raise ValueError("merge_lora: the UNet carries no LoRA adapter")
    unet.fuse_lora()


# --------------------------------------------------------------------------- save / load


def trainable_state_dict(
    unet: torch.nn.Module, implicit: Optional[ImplicitTextEncoder]
) -> Dict[str, torch.Tensor]:
    """The calibrated weights: ``lora.*`` (or ``unet.*`` without LoRA) and ``adapter.*``.

    Without LoRA, the UNet parameters that require grad are saved (all of them after
    :func:`apply_lora`). Tensors are detached, contiguous CPU copies.
    """
    out: Dict[str, torch.Tensor] = {}
    if has_lora(unet):
        lora = get_peft_model_state_dict(unet, adapter_name=_ADAPTER_NAME)
        out.update({f"lora.{k}": v for k, v in lora.items()})
    else:
        out.update({f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad})
    if implicit is not None:
        out.update({f"adapter.{k}": v for k, v in implicit.adapter.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def trainable_metadata(
    unet: torch.nn.Module, implicit: Optional[ImplicitTextEncoder]
) -> Dict[str, str]:
    """String metadata describing the shapes the trainable weights belong to."""
    meta = {"format": FORMAT, "lora": str(has_lora(unet))}
    meta["unet_trainable"] = "lora" if has_lora(unet) else "all"
    if has_lora(unet):
        config = unet.peft_config[_ADAPTER_NAME]
        meta["rank"] = str(int(config.r))
        meta["alpha"] = str(float(config.lora_alpha))
        meta["target_modules"] = json.dumps(sorted(config.target_modules))
    meta["cross_attention_dim"] = str(int(unet.config.cross_attention_dim))
    if implicit is not None:
        meta["num_tokens"] = str(implicit.adapter.num_tokens)
        meta["adapter_in_dim"] = str(implicit.adapter.in_dim)
        meta["adapter_hidden_dim"] = str(implicit.adapter.hidden_dim)
    return meta


def save_trainable_state_dict(
    path: str,
    unet: torch.nn.Module,
    implicit: Optional[ImplicitTextEncoder],
    extra_metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write :func:`trainable_state_dict` + :func:`trainable_metadata` atomically to ``path``."""
    tensors = trainable_state_dict(unet, implicit)
    meta = trainable_metadata(unet, implicit)
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_trainable_state_dict(
    path: str, unet: torch.nn.Module, implicit: Optional[ImplicitTextEncoder]
) -> Dict[str, str]:
    """Load a file written by :func:`save_trainable_state_dict` into ``unet`` and ``implicit``.

    The UNet must already carry the same LoRA (:func:`apply_lora` with the same config).
    Returns the file's metadata. Raises FileNotFoundError for a missing file and ValueError,
    naming the file and field, when the metadata or keys do not match the model.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibrated weights {path!r} do not exist")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    expected = trainable_metadata(unet, implicit)
    for key, value in expected.items():
        if key == "format" or (key == "unet_trainable" and key not in meta and value == "lora"):
            continue  # files written before the key existed carry LoRA
        if meta.get(key) != value:
            raise ValueError(
                f"{path}: metadata {key!r} is {meta.get(key)!r} but the model has {value!r}"
            )
    _load_unet_part(path, unet, tensors)
    if implicit is not None:
        adapter = {k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")}
        missing, unexpected = implicit.adapter.load_state_dict(adapter, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: adapter keys do not match (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    return meta


def _load_unet_part(path: str, unet: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    if has_lora(unet):
        lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
        expected = set(get_peft_model_state_dict(unet, adapter_name=_ADAPTER_NAME))
        if set(lora) != expected:
            missing = sorted(expected - set(lora))[:3]
            unexpected = sorted(set(lora) - expected)[:3]
            raise ValueError(
                f"{path}: LoRA keys do not match (missing {missing}, unexpected {unexpected})"
            )
        flags = {n: p.requires_grad for n, p in unet.named_parameters()}
        set_peft_model_state_dict(unet, lora, adapter_name=_ADAPTER_NAME)
        for name, param in unet.named_parameters():
            param.requires_grad_(flags.get(name, False))
        return
    params = dict(unet.named_parameters())
    full = {k[len("unet.") :]: v for k, v in tensors.items() if k.startswith("unet.")}
    unknown = sorted(set(full) - set(params))
    if unknown:
        raise ValueError(f"{path}: UNet parameters {unknown[:3]} do not exist in the model")
    missing = sorted(set(params) - set(full))
    if missing:
        raise ValueError(
            f"{path}: the full fine-tuning file lacks UNet parameters {missing[:3]} "
            f"({len(missing)} in all)"
        )
    with torch.no_grad():
        for name, value in full.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{path}: UNet parameter {name!r} has shape {tuple(value.shape)}, "
                    f"model has {tuple(params[name].shape)}"
                )
            params[name].copy_(value)


def _matching_module_names(unet: torch.nn.Module, targets: List[str]) -> List[str]:
    """UNet module names equal to, or ending in ``.`` + , one of ``targets`` (PEFT's rule)."""
    return [
        name
        for name, _ in unet.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    ]
