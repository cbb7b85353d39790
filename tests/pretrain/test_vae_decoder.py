"""A decoder-only fine-tune of the tiny VAE keeps its encoder, so the latents (and the UNet
trained on them) stay valid."""

import torch
from pretrain_helpers import tiny_cfg
from safetensors.torch import load_file, save_file
from test_pretrain_steps import CFG

from spade.pretrain import run_pretraining
from spade.pretrain.vae import VaePretrainModel, encoder_parameters, vae_config


def test_decoder_only_vae_fine_tune_keeps_the_latents(stage0_root, tmp_path):
    cfg, _ = tiny_cfg(CFG["vae"], stage0_root, "vae")
    model = VaePretrainModel(vae_config(cfg), 1e-6, 1.0, seed=0, train_encoder=False)
    assert all(not p.requires_grad for p in encoder_parameters(model.vae))
    assert any(p.requires_grad for p in model.vae.decoder.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = model({"images": x})
    assert set(losses) == {"loss_l1", "loss_l2"}  # no KL: nothing could follow its gradient
    # a real run from the tiny VAE's weights: encoder bit-identical, decoder changed
    init = tmp_path / "init.safetensors"
    base = VaePretrainModel(vae_config(cfg), 1e-6, 1.0, seed=0)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(init))
    extra = [
        "PRETRAIN.VAE.TRAIN_ENCODER", "False",
        "MODEL.WEIGHTS", str(init),
        "PRETRAIN.EXPORT_DIR", str(tmp_path / "sd"),
        "OUTPUT_DIR", str(tmp_path / "out_dec"),
    ]  # fmt: skip
    cfg, args = tiny_cfg(CFG["vae"], stage0_root, "vae", max_iter=2, extra=extra)
    run_pretraining(cfg, args)
    out = load_file(str(tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors"))
    before = base.vae.state_dict()
    for name in before:
        same = torch.equal(out[name], before[name])
        if name.startswith(("encoder.", "quant_conv.")):
            assert same, name
    assert any(not torch.equal(out[n], before[n]) for n in before if n.startswith("decoder."))
