"""Pixel decoder: deformable-attention encoder over the coarse scales + FPN path to mask features.

Shape shorthand: B batch, C = CONVS_DIM, Cm = MASK_DIM, H x W padded image, s = COMMON_STRIDE.
"""

from typing import Dict, List, Tuple

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn

from .build import SPADE_PIXEL_DECODER_REGISTRY
from .encoder import DeformableEncoder
from .position_encoding import PositionEmbeddingSine

__all__ = ["MSDeformAttnPixelDecoder"]


@SPADE_PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Encodes the ``deformable_in_features`` jointly with multi-scale deformable attention, then
    walks an FPN path down the remaining finer features to the stride-``common_stride`` map.

    ``forward_features`` returns ``(mask_features [B, Cm, H/s, W/s], multi_scale_features)``, the
    latter the 3 coarsest encoded maps [B, C, h, w], coarsest first (what the transformer decoder's
    masked attention visits round-robin).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        deformable_in_features: List[str],
        conv_dim: int,
        mask_dim: int,
        norm: str,
        common_stride: int,
        encoder_layers: int,
        nheads: int,
        npoints: int,
        dim_feedforward: int,
        dropout: float,
    ):
        """
        Args:
            input_shape: backbone features used (name -> ShapeSpec with channels and stride).
            deformable_in_features: names encoded by the deformable encoder (at least 3).
            conv_dim: channels C of the encoder and the FPN path.
            mask_dim: channels of the mask-feature map.
            norm: detectron2 norm name for the FPN convs ("GN", "BN", "" ...).
            common_stride: stride of the mask-feature map; one of the input strides, not coarser
                than the finest deformable feature.
            encoder_layers, nheads, npoints, dim_feedforward, dropout: deformable encoder shape.
        """
        super().__init__()
        missing = [f for f in deformable_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: deformable features {missing} not among the backbone "
                f"outputs {sorted(input_shape)}"
            )
        if len(deformable_in_features) < 3:
            raise ValueError("MSDeformAttnPixelDecoder: needs at least 3 deformable features")
        ordered = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)  # coarsest first
        self.deformable_in_features = [k for k, _ in ordered if k in deformable_in_features]
        finest_deformable = input_shape[self.deformable_in_features[-1]].stride
        strides = {v.stride for v in input_shape.values()}
        if common_stride not in strides or common_stride > finest_deformable:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: common_stride {common_stride} must be one of the input "
                f"strides {sorted(strides)} and <= {finest_deformable}"
            )
        self.fpn_in_features = [
            k for k, v in ordered if common_stride <= v.stride < finest_deformable
        ]
        self.common_stride = common_stride
        self.input_proj = nn.ModuleList()
        for name in self.deformable_in_features:
            proj = nn.Sequential(
                nn.Conv2d(input_shape[name].channels, conv_dim, kernel_size=1),
                nn.GroupNorm(32 if conv_dim % 32 == 0 else 1, conv_dim),
            )
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.encoder = DeformableEncoder(
            d_model=conv_dim,
            num_layers=encoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            n_levels=len(self.deformable_in_features),
            n_heads=nheads,
            n_points=npoints,
        )
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for name in self.fpn_in_features:
            self.lateral_convs.append(
                Conv2d(
                    input_shape[name].channels,
                    conv_dim,
                    kernel_size=1,
                    bias=use_bias,
                    norm=get_norm(norm, conv_dim),
                )
            )
            self.output_convs.append(
                Conv2d(
                    conv_dim,
                    conv_dim,
                    kernel_size=3,
                    padding=1,
                    bias=use_bias,
                    norm=get_norm(norm, conv_dim),
                    activation=F.relu,
                )
            )
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        for conv in [*self.lateral_convs, *self.output_convs, self.mask_features]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        p = cfg.MODEL.SPADE.PIXEL_DECODER
        missing = [f for f in p.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SPADE.PIXEL_DECODER.IN_FEATURES {missing} not among the backbone outputs "
                f"{sorted(input_shape)}"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in p.IN_FEATURES},
            "deformable_in_features": list(p.DEFORMABLE_IN_FEATURES),
            "conv_dim": p.CONVS_DIM,
            "mask_dim": p.MASK_DIM,
            "norm": p.NORM,
            "common_stride": p.COMMON_STRIDE,
            "encoder_layers": p.ENCODER_LAYERS,
            "nheads": p.NHEADS,
            "npoints": p.NPOINTS,
            "dim_feedforward": p.DIM_FEEDFORWARD,
            "dropout": p.DROPOUT,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """
        Args:
            features: backbone maps by name ([B, C_in, H/stride, W/stride]).

        Returns:
            mask_features [B, Cm, H/s, W/s] and the 3 coarsest encoded maps [B, C, h, w],
            coarsest first.
        """
        maps = [proj(features[n]) for proj, n in zip(self.input_proj, self.deformable_in_features)]
        pos = [self.pe_layer(m) for m in maps]
        encoded = self.encoder(maps, pos)
        out = encoded[-1]
        for name, lateral, output in zip(
            self.fpn_in_features, self.lateral_convs, self.output_convs
        ):
            x = lateral(features[name])
            out = output(
                x + F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            )
        return self.mask_features(out), encoded[:3]

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)
