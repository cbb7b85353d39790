"""DDIM / BELM inversion and sampling on a tiny float64 UNet."""

import pytest
import torch
from calibration_helpers import make_scheduler, make_tiny_unet
from diffusers import DDIMScheduler

from spade.calibration import inversion as inv


def _setup(num_steps=10):
    unet = make_tiny_unet(seed=0).double()
    with torch.no_grad():  # a weaker eps(x) dependence keeps DDIM inversion approximate
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    return unet, x0, inv.unet_eps_fn(unet, ctx), inv.make_grid(make_scheduler(), num_steps)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_belm_exact_and_ddim_approximate():
    unet, x0, eps_fn, grid = _setup()
    belm = inv.belm_invert(eps_fn, x0, grid)
    belm_err = _rel(inv.belm_sample(eps_fn, belm.noise, grid, belm.penultimate), x0)
    ddim = inv.ddim_invert(eps_fn, x0, grid)
    ddim_err = _rel(inv.ddim_sample(eps_fn, ddim.noise, grid), x0)
    assert belm_err < 1e-6
    assert ddim_err < 0.2  # approximate ...
    assert ddim_err > 1e4 * belm_err  # ... and measurably worse than BELM
    # the inverted noise is far from the latent (the chain really moved)
    assert _rel(belm.noise, x0) > 0.5
    # dispatchers give the same results
    assert torch.equal(inv.invert("belm", eps_fn, x0, grid).noise, belm.noise)
    assert torch.equal(
        inv.sample("ddim", eps_fn, ddim, grid), inv.ddim_sample(eps_fn, ddim.noise, grid)
    )


def test_grid_matches_diffusers_ddim_step():
    """Our DDIM update equals diffusers' DDIMScheduler.step on the same timesteps."""
    sched = make_scheduler()
    grid = inv.make_grid(sched, 5)
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(5)
    assert grid.timesteps[1:].tolist() == sorted(ddim.timesteps.tolist())
    assert grid.alphas[0] == 1 and grid.sigmas[0] == 0
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    i = 3
    ours = inv._ddim_move(x.double(), eps.double(), grid, i, i - 1).float()
    theirs = ddim.step(eps, int(grid.timesteps[i]), x, eta=0.0).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_belm_coefficients_hand_values():
    """Coefficients of the O-BELM update against a hand computation on a 3-level grid."""
    a = torch.tensor([1.0, 0.8, 0.6, 0.4], dtype=torch.float64)
    s = (1 - a**2).sqrt()
    grid = inv.DiffusionGrid(torch.tensor([-1, 10, 20, 30]), a, s)
    h1 = s[1] / a[1]
    h2 = s[2] / a[2] - s[1] / a[1]
    c_next, c_cur, c_eps = inv._belm_coefficients(grid, 1, a)
    assert torch.isclose(c_next, h1**2 / h2**2 * a[0] / a[2])
    assert torch.isclose(c_cur, (h2**2 - h1**2) / h2**2 * a[0] / a[1])
    assert torch.isclose(c_eps, h1 * (h1 + h2) / h2 * a[0])
    # a constant eps makes every sampler exact: x_t = alpha_t x0 + sigma_t eps
    x0, e = (
        torch.ones(1, 1, 2, 2, dtype=torch.float64),
        torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64),
    )
    fn = lambda x, t, i: e  # noqa: E731
    res = inv.belm_invert(fn, x0, grid)
    assert torch.allclose(res.noise, a[3] * x0 + s[3] * e)
    assert torch.allclose(inv.belm_sample(fn, res.noise, grid), x0)


def test_bad_inputs():
    _, x0, eps_fn, grid = _setup(3)
    with pytest.raises(ValueError, match="INVERSION"):
        inv.invert("euler", eps_fn, x0, grid)
    with pytest.raises(ValueError, match="NUM_INFERENCE_STEPS"):
        inv.make_grid(make_scheduler(), 1)
    with pytest.raises(ValueError, match="penultimate"):
        inv.belm_sample(eps_fn, x0, grid, penultimate=x0[:1])
    with pytest.raises(ValueError, match="GUIDANCE_SCALE"):
        inv.unet_eps_fn(None, x0, guidance_scale=7.5)
