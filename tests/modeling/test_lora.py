"""LoRA on attn2: trainable set, parameter count, teacher switch, safetensors round trip, merge."""

import pytest
import torch
from safetensors import safe_open

from spade.modeling.backbone.implicit_text import build_implicit_text_encoder
from spade.modeling.backbone.loading import build_diffusion_parts
from spade.modeling.backbone.lora import (
    apply_lora,
    has_lora,
    load_trainable_state_dict,
    lora_disabled,
    lora_layer_names,
    merge_lora,
    save_trainable_state_dict,
    trainable_state_dict,
)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)


def _run(unet, seed=0):
    latent, context = _inputs(seed)
    with torch.no_grad():
        return unet(latent, 5, encoder_hidden_states=context).sample


def _lora_model(make_cfg, init_weights=False, rank=4, seed=0):
    cfg = make_cfg(**{"LORA.INIT_WEIGHTS": init_weights, "LORA.RANK": rank})
    parts = build_diffusion_parts(cfg)
    apply_lora(parts.unet, cfg.MODEL.SPADE.LORA, seed=seed)
    return cfg, parts.unet


def _implicit(cfg, clip, seed=0):
    return build_implicit_text_encoder(cfg, clip, 32, seed=seed)


def test_only_lora_and_adapter_train_and_count_matches_formula(make_cfg, tiny_clip):
    cfg, unet = _lora_model(make_cfg, init_weights=True)
    implicit = _implicit(cfg, tiny_clip)
    names = lora_layer_names(unet)
    assert len(names) == 40 and all(".attn2." in n for n in names)
    assert not any(".attn1." in n for n, _ in unet.named_parameters() if ".lora_" in n)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())
    # per transformer block of width c with text width X: r * (2c + 2(X + c) + 2c) = r (6c + 2X)
    # TINY (32, 64, 64, 64), X = 32: c = 32 in down0 + 2x up3; c = 64 in down1, down2, mid,
    # 2x up1, 2x up2 -> 4 * (3 * (192 + 64) + 7 * (384 + 64)) = 15616
    lora_count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert lora_count == 15616
    # from the layer shapes themselves
    by_shapes = sum(
        4 * (m.base_layer.in_features + m.base_layer.out_features)
        for n, m in unet.named_modules()
        if n in names
    )
    assert by_shapes == lora_count
    # adapter: 32*64 + 64 + 64*(8*32) + 8*32 + LayerNorm 2*32
    adapter_count = sum(p.numel() for p in implicit.parameters() if p.requires_grad)
    assert adapter_count == 32 * 64 + 64 + 64 * 256 + 256 + 64
    assert sum(p.numel() for p in implicit.parameters()) == adapter_count  # CLIP not registered


def test_zero_init_is_identity_and_nonzero_init_changes_output(make_cfg):
    base = _run(build_diffusion_parts(make_cfg()).unet)
    _, zero = _lora_model(make_cfg, init_weights=True)
    assert torch.equal(_run(zero), base)
    _, lora = _lora_model(make_cfg, init_weights=False)
    out = _run(lora)
    assert (out - base).abs().max() > 1e-3
    with lora_disabled(lora):
        assert torch.equal(_run(lora), base)  # the teacher is the same UNet without LoRA
    assert torch.equal(_run(lora), out)


def test_lora_disabled_restores_requires_grad(make_cfg):
    _, unet = _lora_model(make_cfg)
    lora_params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in lora_params[:4]:
        p.requires_grad_(False)
    with lora_disabled(unet):
        pass
    flags = [p.requires_grad for p in lora_params]
    assert flags[:4] == [False] * 4 and all(flags[4:])


def test_targets_outside_cross_attention_are_rejected(make_cfg):
    cfg = make_cfg(**{"LORA.TARGET_MODULES": ["to_q"]})  # would match attn1 too
    unet = build_diffusion_parts(cfg).unet
    with pytest.raises(ValueError, match="outside cross-attention"):
        apply_lora(unet, cfg.MODEL.SPADE.LORA)
    cfg = make_cfg(**{"LORA.TARGET_MODULES": ["attn2.to_nothing"]})
    with pytest.raises(ValueError, match="match no UNet module"):
        apply_lora(unet, cfg.MODEL.SPADE.LORA)
    assert not has_lora(unet)


def test_safetensors_round_trip_is_bit_exact(tmp_path, make_cfg, tiny_clip):
    cfg, unet = _lora_model(make_cfg, init_weights=False, seed=3)
    implicit = _implicit(cfg, tiny_clip, seed=3)
    path = str(tmp_path / "calib" / "trainable.safetensors")
    save_trainable_state_dict(path, unet, implicit, extra_metadata={"iteration": 12})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["rank"] == "4" and meta["alpha"] == "4.0" and meta["num_tokens"] == "8"
    assert meta["iteration"] == "12"
    assert len(keys) == 80 + 6 and all(k.startswith(("lora.", "adapter.")) for k in keys)

    cfg2, fresh = _lora_model(make_cfg, init_weights=True)
    implicit2 = _implicit(cfg2, tiny_clip, seed=9)
    load_trainable_state_dict(path, fresh, implicit2)
    assert torch.equal(_run(fresh), _run(unet))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(implicit2(pixels), implicit(pixels))
    a, b = trainable_state_dict(unet, implicit), trainable_state_dict(fresh, implicit2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" in n)


def test_load_rejects_mismatched_metadata_and_missing_file(tmp_path, make_cfg, tiny_clip):
    cfg, unet = _lora_model(make_cfg, rank=4)
    path = str(tmp_path / "t.safetensors")
    save_trainable_state_dict(path, unet, _implicit(cfg, tiny_clip))
    cfg2, other = _lora_model(make_cfg, rank=2)
    with pytest.raises(ValueError, match=r"t\.safetensors.*'rank'"):
        load_trainable_state_dict(path, other, _implicit(cfg2, tiny_clip))
    cfg3 = make_cfg(**{"IMPLICIT_TEXT.NUM_TOKENS": 4})
    with pytest.raises(ValueError, match="'num_tokens'"):
        load_trainable_state_dict(path, unet, build_implicit_text_encoder(cfg3, tiny_clip, 32))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_trainable_state_dict(str(tmp_path / "missing.safetensors"), unet, None)


def test_merged_and_unmerged_give_same_output(make_cfg):
    _, unet = _lora_model(make_cfg, init_weights=False)
    before = _run(unet)
    merge_lora(unet)
    assert torch.allclose(_run(unet), before, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(build_diffusion_parts(make_cfg()).unet)


def test_full_finetuning_ablation_saves_whole_unet(tmp_path, make_cfg, tiny_clip):
    cfg = make_cfg(**{"LORA.ENABLED": False})
    unet = build_diffusion_parts(cfg).unet
    apply_lora(unet, cfg.MODEL.SPADE.LORA)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    # "no LoRA" fine-tunes the whole UNet, not only the attn2 projections
    assert not has_lora(unet) and trainable == {n for n, _ in unet.named_parameters()}
    assert any(".attn1." in n for n in trainable) and any("conv_in" in n for n in trainable)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in trainable:
                p.add_(0.01)
    path = str(tmp_path / "ft.safetensors")
    save_trainable_state_dict(path, unet, None)
    fresh = build_diffusion_parts(cfg).unet
    apply_lora(fresh, cfg.MODEL.SPADE.LORA)
    assert not torch.equal(_run(fresh), _run(unet))
    load_trainable_state_dict(path, fresh, None)
    assert torch.equal(_run(fresh), _run(unet))
    partial = str(tmp_path / "partial.safetensors")
    unet.conv_in.requires_grad_(False)  # a file missing UNet parameters is refused
    save_trainable_state_dict(partial, unet, None)
    with pytest.raises(ValueError, match="partial.safetensors: the full fine-tuning file lacks"):
        load_trainable_state_dict(partial, fresh, None)
