"""Stage-1 builder: the UNet and CLIP it combines must agree on the text width."""

import pytest
from detectron2.config import get_cfg

from spade.calibration import builder
from spade.config import add_spade_config
from spade.modeling.backbone import build_clip


def test_text_width_mismatch_is_a_clear_error(monkeypatch):
    cfg = get_cfg()
    add_spade_config(cfg)  # TINY preset: cross_attention_dim 32 = CLIP text width 32
    cfg.MODEL.DEVICE = "cpu"
    wide = cfg.clone()
    wide.MODEL.SPADE.CLIP.TINY.WIDTH = 48  # as a CLIP folder of another width would load
    monkeypatch.setattr(builder, "build_clip", lambda _cfg: build_clip(wide))
    with pytest.raises(ValueError, match=r"cross_attention_dim \(32\).*\(48\).*MODEL.SPADE.CLIP"):
        builder.build_calibration_parts(cfg)
