"""Capture UNet block outputs by module name, and find their strides and channels.

Blocks are chosen by name (``"up_blocks.1"``, ``"up_blocks.2.attentions.0"``), never by index
into a flat list. Capturing uses forward hooks that exist only inside :func:`capture_outputs`, so a
shared UNet carries no hooks outside a backbone pass.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import torch
from torch import nn

__all__ = ["BlockSpec", "capture_outputs", "probe_blocks", "resolve_sources"]


@dataclass(frozen=True)
class BlockSpec:
    """A captured UNet block: its module name, output channels and stride w.r.t. the image."""

    name: str
    channels: int
    stride: int


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Inside the block, every forward of ``model.<name>`` stores its output in the yielded dict.

    A module returning a tuple (diffusers down blocks return ``(hidden, residuals)``) contributes
    its first element. Raises KeyError naming an unknown module.
    """
    store: Dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise KeyError(
                    f"MODEL.SPADE.DIFFUSION.FEATURE_BLOCKS: no UNet module {name!r}"
                ) from e

            def hook(_module, _inputs, output, _name=name):
                store[_name] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def probe_blocks(
    unet: nn.Module, names: Sequence[str], latent_stride: int, num_downsamples: int
) -> List[BlockSpec]:
    """Find each block's output channels and image stride with one tiny no-grad UNet pass.

    The probe latent has side ``2 ** num_downsamples * 2`` (the smallest the UNet accepts, doubled
    so stride ratios are exact), batch 1, one conditioning token of zeros.
    """
    side = 2**num_downsamples * 2
    param = next(unet.parameters())
    latent = torch.zeros(
        1, unet.config.in_channels, side, side, device=param.device, dtype=param.dtype
    )
    context = torch.zeros(
        1, 1, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype
    )
    with torch.no_grad(), capture_outputs(unet, names) as store:
        unet(latent, 0, encoder_hidden_states=context)
    specs = []
    for name in names:
        if name not in store:
            raise KeyError(f"MODEL.SPADE.DIFFUSION.FEATURE_BLOCKS: module {name!r} never ran")
        out = store[name]
        if out.dim() != 4 or out.shape[-1] > side or side % out.shape[-1]:
            raise ValueError(
                f"UNet block {name!r} output {tuple(out.shape)} is not a feature map at a "
                f"power-of-two fraction of the latent side {side}"
            )
        specs.append(BlockSpec(name, int(out.shape[1]), latent_stride * side // int(out.shape[-1])))
    return specs


def resolve_sources(blocks: Sequence[BlockSpec], stride: int) -> List[BlockSpec]:
    """Blocks feeding an output of ``stride``: those at exactly that stride, else the nearest.

    Nearest means the smallest |log2(block stride / stride)|; ties go to the finer blocks (more
    spatial detail to pool from). All blocks at the chosen stride are returned (concatenated).
    """
    if not blocks:
        raise ValueError("no UNet feature blocks configured")
    strides = sorted({b.stride for b in blocks})
    best = min(strides, key=lambda s: (abs(math.log2(s / stride)), s))
    return [b for b in blocks if b.stride == best]
