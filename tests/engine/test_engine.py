"""Checkpointer, optimizer builder and the non-finite loss guard on a toy model."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from torch import nn

from spade.config import add_spade_config
from spade.engine import (
    LossGuard,
    NonFiniteLossError,
    SafetensorsCheckpointer,
    build_spade_optimizer,
    build_train_loop,
    contiguous_group_norm_inputs,
    trainable_state_dict,
)


class FrozenPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.pretrained = nn.Linear(3, 3)
        self.proj = nn.Linear(3, 2)
        self.pretrained.requires_grad_(False)

    def frozen_state_prefixes(self):
        return ["pretrained."]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = FrozenPart()
        self.head = nn.Linear(2, 1)
        self.norm = nn.LayerNorm(2)
        self.query = nn.Embedding(4, 2)
        self.background_embed = nn.Parameter(torch.zeros(1, 2))

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = self.head(self.norm(self.backbone.proj(self.backbone.pretrained(x))))
        return {
            "loss_a": y.pow(2).mean() * batch[0]["scale"],
            "loss_b": (self.query.weight.sum() + self.background_embed.sum()) * 0,
        }


def _cfg():
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-2
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    return cfg


def test_checkpoint_roundtrip_safetensors_without_frozen_parts(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ck = SafetensorsCheckpointer(model, str(tmp_path), optimizer=opt)
    ck.save("model_0000009", iteration=9)
    files = sorted(os.listdir(tmp_path))
    assert files == ["last_checkpoint", "model_0000009.safetensors", "model_0000009.state.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.safetensors"
    saved = trainable_state_dict(model)
    assert not any(k.startswith("backbone.pretrained.") for k in saved)
    assert "backbone.proj.weight" in saved

    torch.manual_seed(1)
    other = Toy()
    other.backbone.pretrained.load_state_dict(model.backbone.pretrained.state_dict())
    ck2 = SafetensorsCheckpointer(
        other,
        str(tmp_path),
        optimizer=torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1),
    )
    assert ck2.has_checkpoint()
    extra = ck2.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_checkpoint_refuses_pickles_and_reports_corruption(tmp_path):
    model = Toy()
    ck = SafetensorsCheckpointer(model, str(tmp_path))
    pkl = tmp_path / "weights.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="pickled files are never loaded"):
        ck.load(str(pkl))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        ck.load(str(bad))


def test_optimizer_groups_skip_frozen_and_apply_multipliers():
    cfg = _cfg()
    model = Toy()
    opt = build_spade_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert "backbone.pretrained.weight" not in groups  # frozen: left out
    assert groups["backbone.proj.weight"]["lr"] == pytest.approx(1e-3)  # backbone multiplier
    assert groups["head.weight"]["lr"] == pytest.approx(1e-2)
    assert groups["head.weight"]["weight_decay"] == pytest.approx(0.05)
    assert groups["norm.weight"]["weight_decay"] == 0.0
    assert groups["query.weight"]["weight_decay"] == 0.0
    assert groups["background_embed"]["weight_decay"] == 0.0
    assert type(opt).__name__ == "AdamWWithFullModelGradientClipping"


def test_full_model_gradient_clipping_bounds_the_global_norm():
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    p = nn.Parameter(torch.zeros(4))
    model = nn.Module()
    model.p = p
    opt = build_spade_optimizer(cfg, model)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    opt.step()
    assert p.grad.norm().item() == pytest.approx(0.5, rel=1e-4)


def _loader(scale):
    while True:
        yield [{"x": torch.ones(3), "scale": scale}]


def _loop(scale, policy="raise"):
    cfg = _cfg()
    cfg.SOLVER.NONFINITE_LOSS = policy
    model = Toy()
    return model, build_train_loop(cfg, model, _loader(scale), build_spade_optimizer(cfg, model))


def test_nonfinite_loss_raises_naming_iteration_and_term():
    _, loop = _loop(float("nan"))
    assert isinstance(loop.model, LossGuard)
    loop.iter = 7
    with EventStorage(7), pytest.raises(NonFiniteLossError, match=r"iteration 7: loss_a=nan"):
        loop.run_step()


def test_nonfinite_loss_skip_policy_leaves_weights_untouched():
    model, loop = _loop(float("inf"), policy="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop.iter = 0
    with EventStorage(0):
        loop.run_step()
    assert loop.model.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a finite step afterwards updates the weights again
    loop._data_loader_iter_obj = _loader(1.0)
    with EventStorage(1):
        loop.run_step()
    assert not torch.equal(model.head.weight, before["head.weight"])


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match="SOLVER.NONFINITE_LOSS must be raise or skip"):
        _loop(1.0, policy="ignore")


def test_diffusion_backbone_checkpoints_leave_out_frozen_pretrained_parts():
    from detectron2.modeling import build_backbone

    import spade.modeling  # noqa: F401  (registers the backbone)
    from spade.engine.checkpoint import frozen_state_prefixes

    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_diffusion_backbone"
    cfg.MODEL.SPADE.DIFFUSION.OUT_CHANNELS = 32
    cfg.INPUT.FORMAT = "RGB"
    backbone = build_backbone(cfg)
    assert sorted(frozen_state_prefixes(backbone)) == ["implicit_text.", "unet.", "vae."]
    saved = trainable_state_dict(backbone)
    assert saved and all(k.startswith("projections.") for k in saved), sorted(saved)[:5]


def test_group_norm_inputs_made_contiguous_without_changing_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    h = model[0](x).to(memory_format=torch.channels_last)
    assert not h.is_contiguous()
    reference = model[1](h)
    assert seen == [False]
    assert contiguous_group_norm_inputs(model) == 1
    seen.clear()
    out = model[1](h)
    # the hook registered first still sees the caller's tensor; the module sees a contiguous one
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)  # summation order only
    captured = []
    model[1].register_forward_pre_hook(lambda m, a: captured.append(a[0].is_contiguous()))
    model[1](h)
    assert captured == [True]


def test_cpu_autocast_guard_runs_the_forward_in_bf16_and_fixes_group_norm_layout():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8))
    dtypes, flash = [], []
    model[0].register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))

    class Losses(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            flash.append(torch.backends.cuda.flash_sdp_enabled())  # the global SDPA choice
            return {"loss": self.inner(x).float().square().mean()}

    guard = LossGuard(Losses(model), autocast_dtype=torch.bfloat16)
    assert len(model[1]._forward_pre_hooks) == 1
    guard.train()
    losses = guard(torch.randn(2, 3, 6, 6))
    assert dtypes == [torch.bfloat16] and losses["loss"].dtype == torch.float32
    assert flash == [False]  # attention on the math kernel inside the guard only
    losses["loss"].backward()
    assert model[0].weight.grad.dtype == torch.float32  # master weights stay fp32
    plain = LossGuard(Losses(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))))
    plain.train()
    plain(torch.randn(1, 3, 2, 2))
    assert flash == [False, True] and torch.backends.cuda.flash_sdp_enabled()
    assert len(plain.model.inner[1]._forward_pre_hooks) == 0  # no autocast: no hooks
