"""DiffusionBackbone: shapes vs output_shape(), trainability, determinism, calibrated weights,
dense CLIP features, and a training step inside a stock detectron2 SemanticSegmentor."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

from spade.modeling.backbone.diffusion_backbone import DiffusionBackbone, build_diffusion_backbone
from spade.modeling.backbone.implicit_text import build_implicit_text_encoder
from spade.modeling.backbone.loading import build_clip, build_diffusion_parts
from spade.modeling.backbone.lora import apply_lora, save_trainable_state_dict


def _images(b=2, h=128, w=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g) * 40


def _backbone(make_cfg, **overrides):
    cfg = make_cfg(**overrides)
    cfg.MODEL.BACKBONE.NAME = "build_diffusion_backbone"
    return build_backbone(cfg)


def test_outputs_match_output_shape(make_cfg):
    backbone = _backbone(make_cfg)
    assert isinstance(backbone, DiffusionBackbone)
    assert backbone.size_divisibility == 64
    assert {b.name: b.stride for b in backbone.blocks} == {
        "up_blocks.0": 32,
        "up_blocks.1": 16,
        "up_blocks.2": 8,
        "up_blocks.3": 8,
    }
    assert {b.name: b.channels for b in backbone.blocks}["up_blocks.3"] == 32
    backbone.eval()
    with torch.no_grad():
        out = backbone(_images())
    shapes = backbone.output_shape()
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, spec in shapes.items():
        assert out[name].shape == (2, spec.channels, 128 // spec.stride, 192 // spec.stride)
        assert spec.channels == 32
    assert [shapes[n].stride for n in out] == [4, 8, 16, 32]


def test_bad_inputs_are_rejected(make_cfg):
    backbone = _backbone(make_cfg)
    with pytest.raises(ValueError, match="size_divisibility 64"):
        backbone(_images(1, 96, 128))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        backbone(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="'p3' is not 'resN'"):
        _backbone(make_cfg, **{"DIFFUSION.OUT_FEATURES": ["p3"]})
    with pytest.raises(KeyError, match="up_blocks.9"):
        _backbone(make_cfg, **{"DIFFUSION.FEATURE_BLOCKS": ["up_blocks.9"]})
    cfg = make_cfg()
    with pytest.raises(ValueError, match="3 input channels"):
        build_diffusion_backbone(cfg, ShapeSpec(channels=4))
    with pytest.raises(ValueError, match="TIMESTEP"):
        _backbone(make_cfg, **{"DIFFUSION.TIMESTEP": 1000})


def test_text_width_mismatch_is_a_clear_error(make_cfg, monkeypatch):
    """The calibrated UNet must still match the CLIP whose text conditioned it in stage 1."""
    import spade.modeling.backbone.diffusion_backbone as module

    wide = make_cfg(**{"CLIP.TINY.WIDTH": 48})  # as a CLIP folder of another width would load
    monkeypatch.setattr(module, "build_clip", lambda _cfg: build_clip(wide))
    with pytest.raises(ValueError, match=r"cross_attention_dim \(32\).*\(48\).*MODEL.SPADE.CLIP"):
        _backbone(make_cfg)


def test_noised_features_are_deterministic(make_cfg):
    noisy = _backbone(make_cfg, **{"DIFFUSION.TIMESTEP": 200}).eval()
    clean = _backbone(make_cfg).eval()
    x = _images(1, 64, 64)
    with torch.no_grad():
        a, b, c = noisy(x), noisy(x), clean(x)
    assert torch.equal(a["res3"], b["res3"])
    assert not torch.allclose(a["res3"], c["res3"])


def test_unnormalisation_recovers_rgb(make_cfg):
    backbone = _backbone(make_cfg)  # detectron2 default: BGR, mean (103.53, 116.28, 123.675)
    rgb = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 64, 64) * 255
    bgr = rgb.flip(1)
    normalised = (bgr - backbone.pixel_mean) / backbone.pixel_std
    assert torch.allclose(backbone.unit_rgb(normalised), rgb / 255, atol=1e-6)


def test_only_projections_train_by_default(make_cfg):
    backbone = _backbone(make_cfg, **{"LORA.INIT_WEIGHTS": False}).train()
    out = backbone(_images(1, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    with_grad = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("projections.") for n in with_grad)
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if ".lora_" in n)
    assert not any(k.startswith("clip") for k in backbone.state_dict())


@pytest.mark.parametrize(
    "flag,prefix",
    [("DIFFUSION.TRAIN_ADAPTER", "implicit_text.adapter."), ("DIFFUSION.TRAIN_LORA", "unet.")],
)
def test_training_lora_or_adapter_passes_grad(make_cfg, flag, prefix):
    backbone = _backbone(make_cfg, **{flag: True, "LORA.INIT_WEIGHTS": False}).train()
    out = backbone(_images(1, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    grads = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert any(n.startswith(prefix) for n in grads)
    assert all(n.startswith(("projections.", prefix)) for n in grads)
    if prefix == "unet.":
        assert all(".lora_" in n for n in grads if n.startswith("unet."))


def test_calibrated_weights_load_at_build(tmp_path, make_cfg):
    cfg = make_cfg(**{"LORA.INIT_WEIGHTS": False, "LORA.SEED": 5})
    parts, clip = build_diffusion_parts(cfg), build_clip(cfg)
    apply_lora(parts.unet, cfg.MODEL.SPADE.LORA, seed=5)
    implicit = build_implicit_text_encoder(cfg, clip, 32, seed=5)
    path = tmp_path / "calibrated.safetensors"
    save_trainable_state_dict(str(path), parts.unet, implicit)

    backbone = _backbone(make_cfg, **{"DIFFUSION.CALIBRATED_WEIGHTS": str(path)}).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(backbone.implicit_text(pixels), implicit(pixels))
        context = implicit(pixels)
        assert torch.equal(
            backbone.unet(latent, 0, encoder_hidden_states=context).sample,
            parts.unet(latent, 0, encoder_hidden_states=context).sample,
        )
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _backbone(make_cfg, **{"DIFFUSION.CALIBRATED_WEIGHTS": str(tmp_path / "nope.safetensors")})


def test_merge_for_inference_matches_and_unmerges_for_training(make_cfg):
    torch.manual_seed(0)  # projections draw from the global RNG, as detectron2 layers do
    plain = _backbone(make_cfg, **{"LORA.INIT_WEIGHTS": False}).eval()
    torch.manual_seed(0)
    merged = _backbone(make_cfg, **{"LORA.INIT_WEIGHTS": False, "LORA.MERGE_FOR_INFERENCE": True})
    merged.eval()
    x = _images(1, 64, 64)
    with torch.no_grad():
        a, b = plain(x), merged(x)
    assert merged._lora_merged
    for k in a:  # GroupNorm amplifies the ~1e-6 differences of merged vs unmerged UNet weights
        err = (a[k] - b[k]).abs().max() / a[k].abs().max()
        assert err < 5e-3, (k, float(err))  # measured up to 7e-4; a missing merge is O(1)
    merged.train()
    assert not merged._lora_merged
    layer = merged.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_q")
    assert not layer.merged


def test_clip_crop_embeddings_encode_the_cropped_region(make_cfg):
    backbone = _backbone(make_cfg).eval()
    x = _images(2, 128, 192)
    s = backbone.clip.image_size
    s = s[0] if isinstance(s, (tuple, list)) else int(s)  # 64: a 2s x 2s box is 2x2 averaged
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 2 * s, 2 * s], [64.0, 0.0, 64 + 2 * s, 2 * s]],
            [[10.0, 0.0, 10 + 2 * s, 2 * s]] * 2,
        ]
    )
    out = backbone.clip_crop_embeddings(x, boxes)
    assert out.shape == (2, 2, backbone.clip.embed_dim) and not out.requires_grad
    unit = backbone.unit_rgb(x)
    mean = torch.tensor(backbone.clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.clip.image_std).view(1, 3, 1, 1)
    for b, i in [(0, 0), (0, 1), (1, 0)]:
        x0 = int(boxes[b, i, 0])
        crop = F.avg_pool2d(unit[b : b + 1, :, : 2 * s, x0 : x0 + 2 * s], 2)
        with torch.no_grad():
            expected = backbone.clip.model.encode_image((crop - mean) / std)[0]
        assert torch.allclose(out[b, i], expected, atol=1e-4)
    assert torch.allclose(out[1, 0], out[1, 1])
    assert backbone.clip_crop_embeddings(x, torch.zeros(2, 0, 4)).shape == (2, 0, out.shape[-1])
    with pytest.raises(ValueError, match="boxes must be"):
        backbone.clip_crop_embeddings(x, torch.zeros(3, 1, 4))


def test_clip_dense_features_are_projected_patch_tokens(make_cfg):
    backbone = _backbone(make_cfg).eval()
    x = _images(2, 64, 128)
    dense = backbone.clip_dense_features(x)
    assert dense.shape == (2, 32, 8, 8) and not dense.requires_grad
    visual = backbone.clip.model.visual
    from spade.modeling.backbone.loading import clip_preprocess

    visual.output_tokens = True  # open_clip's own path: (pooled, tokens after ln_post)
    try:
        with torch.no_grad():
            _, tokens = visual(clip_preprocess(backbone.unit_rgb(x), backbone.clip))
    finally:
        visual.output_tokens = False
    expected = (tokens @ visual.proj).view(2, 8, 8, 32).permute(0, 3, 1, 2)
    assert torch.allclose(dense, expected, atol=1e-5)


def test_to_dtype_reaches_the_unregistered_clip(make_cfg):
    backbone = _backbone(make_cfg).to(torch.float64)
    assert backbone.clip.model.visual.proj.dtype == torch.float64
    assert backbone.implicit_text.clip_visual is backbone.clip.model.visual  # shared, not copied


def test_plugs_into_stock_semantic_segmentor(make_cfg):
    cfg = make_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.BACKBONE.NAME = "build_diffusion_backbone"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    model = build_model(cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = [
        {
            "image": torch.randint(0, 256, (3, 60, 90), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 3, (60, 90), generator=g),
        },
        {
            "image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 3, (64, 64), generator=g),
        },
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    sum(losses.values()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.projections.") for n in changed)
    assert any(n.startswith("sem_seg_head.") for n in changed)
    assert not any(n.startswith(("backbone.unet.", "backbone.vae.")) for n in changed)
    model.eval()
    with torch.no_grad():
        result = model([{"image": batch[0]["image"], "height": 60, "width": 90}])
    assert result[0]["sem_seg"].shape == (3, 60, 90)


def test_feature_cache_reuses_features_of_seen_images(make_cfg):
    plain = _backbone(make_cfg, **{"LORA.INIT_WEIGHTS": False}).train()
    cached = _backbone(make_cfg, **{"LORA.INIT_WEIGHTS": False, "DIFFUSION.FEATURE_CACHE": 2})
    cached.load_state_dict(plain.state_dict())
    cached.train()
    a, b, c = _images(1, 64, 64, seed=1), _images(1, 64, 64, seed=2), _images(1, 64, 64, seed=3)
    calls = []
    original = cached.unet_features
    cached.unet_features = lambda latent, context: (
        calls.append(len(latent)) or original(latent, context)
    )

    def same(batch):
        with torch.no_grad():
            want, got = plain(batch), cached(batch)
        # equal up to float rounding (a batch of other images computes slightly differently)
        # (on a Xeon with AMX, 2026-12-02: up to 8.5e-4 on features up to 4.4; different images
        # differ by O(1))
        return all(torch.allclose(want[k], got[k], atol=2e-3, rtol=1e-3) for k in want)

    assert same(torch.cat([a, b, a]))  # a twice in one batch: one UNet pass of 2 images
    assert calls == [2] and (cached.feature_cache_misses, cached.feature_cache_hits) == (2, 1)
    assert same(torch.cat([b, a])) and calls == [2]  # both cached: no UNet pass at all
    assert same(c) and calls == [2, 1]  # c evicts the least recently used (b)
    assert same(b) and calls == [2, 1, 1]
    assert len(cached._feature_cache) == 2
    # gradients still reach the projections from cached features
    sum(v.square().mean() for v in cached(a).values()).backward()
    assert all(p.grad is not None for p in cached.projections.parameters())
    # inference never uses (or fills) the cache
    cached.eval()
    with torch.no_grad():
        cached(_images(1, 64, 64, seed=4))
    assert calls[-1] == 1 and len(cached._feature_cache) == 2
    with pytest.raises(ValueError, match="FEATURE_CACHE"):
        _backbone(make_cfg, **{"DIFFUSION.FEATURE_CACHE": 2, "DIFFUSION.TRAIN_LORA": True})
    with pytest.raises(ValueError, match="TIMESTEP 0"):
        _backbone(make_cfg, **{"DIFFUSION.FEATURE_CACHE": 2, "DIFFUSION.TIMESTEP": 100})


def test_latent_channels_follow_the_vae(make_cfg):
    """Nothing assumes SD 1.5's 4 latent channels: a 16-channel VAE (SD 3's width) and its UNet
    run through the backbone, and the features depend on the image."""
    backbone = _backbone(make_cfg, **{"DIFFUSION.TINY.LATENT_CHANNELS": 16})
    assert backbone.vae.config.latent_channels == 16 and backbone.unet.config.in_channels == 16
    backbone.eval()
    with torch.no_grad():
        a, b = backbone(_images(1, 64, 64, seed=0)), backbone(_images(1, 64, 64, seed=1))
    assert a["res2"].shape == (1, 32, 16, 16)
    assert not torch.allclose(a["res2"], b["res2"])
