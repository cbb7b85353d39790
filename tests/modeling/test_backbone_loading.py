"""Model loading: TINY preset, round trips through the real loading path, clear errors."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from spade.modeling.backbone.loading import (
    build_clip,
    build_diffusion_parts,
    check_text_conditioning,
    clip_preprocess,
    encode_text_tokens,
    num_unet_downsamples,
    tokenize,
    vae_downsample_factor,
)


def _unet_out(parts, seed=1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 3, parts.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return parts.unet(latent, 10, encoder_hidden_states=context).sample


def test_tiny_preset_shapes_and_frozen(tiny_diffusion, tiny_clip):
    d = tiny_diffusion
    assert num_unet_downsamples(d.unet) == 3
    assert vae_downsample_factor(d.vae) == 8
    # TINY latents are scaled to unit variance on the seeded probe (as SD chose 0.18215)
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        probe_latent = d.vae.encode(probe).latent_dist.mean * d.latent_scale
    assert probe_latent.std().item() == pytest.approx(1.0, rel=1e-4)
    assert d.latent_scale == pytest.approx(d.vae.config.scaling_factor)
    assert d.unet.config.cross_attention_dim == tiny_clip.text_width == 32
    assert d.scheduler.config.beta_schedule == "scaled_linear"
    assert d.scheduler.config.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in d.unet.parameters())
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())
    assert tiny_clip.image_size == (64, 64) and tiny_clip.embed_dim == 32
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        latent = d.vae.encode(x).latent_dist.mean
    assert latent.shape == (2, 4, 8, 12)


def test_tiny_preset_is_seeded(make_cfg):
    a, b = build_diffusion_parts(make_cfg()), build_diffusion_parts(make_cfg())
    assert torch.equal(_unet_out(a), _unet_out(b))
    c = build_diffusion_parts(make_cfg(**{"DIFFUSION.TINY.SEED": 1}))
    assert not torch.equal(_unet_out(a), _unet_out(c))


def test_diffusers_dir_round_trip(tmp_path, tiny_diffusion, monkeypatch, make_cfg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tiny_diffusion
    d.vae.save_pretrained(tmp_path / "vae")
    d.unet.save_pretrained(tmp_path / "unet")
    d.scheduler.save_pretrained(tmp_path / "scheduler")
    cfg = make_cfg(**{"DIFFUSION.PRETRAINED": str(tmp_path), "DIFFUSION.TINY.SEED": 7})
    loaded = build_diffusion_parts(cfg)
    assert torch.equal(_unet_out(loaded), _unet_out(d))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.vae.encode(x).latent_dist.mean, d.vae.encode(x).latent_dist.mean)
    assert loaded.scheduler.config.beta_end == pytest.approx(0.012)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_tiny_clip_checkpoint_round_trip(tmp_path, tiny_clip, make_cfg):
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    cfg = make_cfg(**{"CLIP.PRETRAINED": str(path), "CLIP.TINY.SEED": 3})
    loaded = build_clip(cfg)
    texts = ["a circle left of a square", "sky"]
    assert torch.equal(encode_text_tokens(loaded, texts), encode_text_tokens(tiny_clip, texts))


def test_named_open_clip_model_round_trip(tmp_path, tiny_clip, make_cfg):
    """A model name registered with open_clip + a checkpoint path goes through create_model."""
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    t = make_cfg().MODEL.SPADE.CLIP.TINY
    model_cfg = {
        "embed_dim": t.EMBED_DIM,
        "vision_cfg": {
            "image_size": t.IMAGE_SIZE,
            "layers": t.LAYERS,
            "width": t.WIDTH,
            "head_width": 8,
            "patch_size": t.PATCH_SIZE,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": t.WIDTH,
            "heads": t.WIDTH // 8,
            "layers": t.LAYERS,
        },
    }
    (cfg_dir / "spade-test-tiny-clip.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(str(cfg_dir))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(weights))
    cfg = make_cfg(**{"CLIP.MODEL_NAME": "spade-test-tiny-clip", "CLIP.PRETRAINED": str(weights)})
    loaded = build_clip(cfg)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), tiny_clip.model.encode_image(pixels))
    assert loaded.text_width == 32 and loaded.image_size == (64, 64)


@pytest.mark.parametrize(
    "key,value",
    [("DIFFUSION.PRETRAINED", "/nonexistent/sd15"), ("DIFFUSION.PRETRAINED", "./models/a/b")],
)
def test_missing_diffusion_path_is_clear_error(key, value, make_cfg):
    with pytest.raises(FileNotFoundError, match="MODEL.SPADE.DIFFUSION.PRETRAINED"):
        build_diffusion_parts(make_cfg(**{key: value}))


def test_unreachable_hub_id_offline_is_clear_error(monkeypatch, make_cfg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="MODEL.SPADE.DIFFUSION.PRETRAINED"):
        build_diffusion_parts(make_cfg(**{"DIFFUSION.PRETRAINED": "no-such-org/no-such-model"}))


def test_missing_clip_checkpoint_is_clear_error(make_cfg):
    with pytest.raises(FileNotFoundError, match="MODEL.SPADE.CLIP.PRETRAINED"):
        build_clip(make_cfg(**{"CLIP.PRETRAINED": "/nonexistent/clip.safetensors"}))
    cfg = make_cfg(**{"CLIP.MODEL_NAME": "ViT-L-14", "CLIP.PRETRAINED": "/nope/vitl.bin"})
    with pytest.raises(FileNotFoundError, match="MODEL.SPADE.CLIP.PRETRAINED"):
        build_clip(cfg)


def test_pretrained_preset_without_weights_is_error(make_cfg):
    with pytest.raises(ValueError, match="MODEL.SPADE.DIFFUSION.PRETRAINED"):
        build_diffusion_parts(make_cfg(PRESET="PRETRAINED"))


def test_mismatched_tiny_widths_are_rejected(make_cfg, tiny_clip, tiny_diffusion):
    with pytest.raises(ValueError, match="CROSS_ATTENTION_DIM"):
        build_diffusion_parts(make_cfg(**{"DIFFUSION.TINY.CROSS_ATTENTION_DIM": 16}))
    check_text_conditioning(tiny_diffusion, tiny_clip)
    wide = build_clip(make_cfg(**{"CLIP.TINY.WIDTH": 48}))
    with pytest.raises(ValueError, match=r"cross_attention_dim \(32\).*\(48\)"):
        check_text_conditioning(tiny_diffusion, wide)


def test_text_token_states(tiny_clip):
    tokens = tokenize(tiny_clip, ["a circle", "a red star above the sky"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert int(tokens[0, 0]) == 49406 and int(tokens[0, 3]) == 49407  # sot, a, circle, eot
    states = encode_text_tokens(tiny_clip, ["a circle", "a red star above the sky"])
    assert states.shape == (2, 77, 32)
    # the causal mask makes the start token's state independent of the text
    assert torch.allclose(states[0, 0], states[1, 0], atol=1e-6)
    assert not torch.allclose(states[0, 2], states[1, 2])
    # ln_final output: zero mean per token (affine init is identity)
    assert states.mean(-1).abs().max() < 1e-4
    with pytest.raises(TypeError):
        tokenize(tiny_clip, "a single string")


def test_clip_preprocess_values(tiny_clip):
    images = torch.full((1, 3, 10, 20), 0.5)
    out = clip_preprocess(images, tiny_clip)
    assert out.shape == (1, 3, 64, 64)
    expected = (0.5 - tiny_clip.image_mean[0]) / tiny_clip.image_std[0]
    assert torch.allclose(out[0, 0], torch.full((64, 64), expected))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        clip_preprocess(torch.zeros(3, 8, 8), tiny_clip)
