"""Deterministic inversion and sampling of a latent diffusion model (DDIM and BELM).

Stage 1 of SPADE inverts the VAE latent of a real image to noise and samples it back with the
frozen teacher UNet, recording the teacher's cross-attention maps on the way down.

Notation (one grid of ``N`` steps, shared by every function here):

* states ``x_0 .. x_N``; ``x_0`` is the clean latent, ``x_N`` the noise;
* ``abar_i`` the cumulative alpha of state ``i`` (``abar_0 = 1``), ``alpha_i = sqrt(abar_i)``,
  ``sigma_i = sqrt(1 - abar_i)``; state ``i >= 1`` is evaluated by the UNet at the scheduler's
  training timestep ``t_i``;
* ``h_i = sigma_i / alpha_i - sigma_{i-1} / alpha_{i-1}``.

DDIM sampling ``x_{i-1} = alpha_{i-1} (x_i - sigma_i eps) / alpha_i + sigma_{i-1} eps`` with
``eps = eps(x_i, t_i)``; DDIM inversion uses the same update upwards with ``eps(x_{i-1}, t_i)``
(as diffusers' DDIMInverseScheduler does), which is only approximate.

O-BELM sampling (Wang et al., NeurIPS 2024), for ``i = N-1 .. 1``::

    x_{i-1} = (h_i^2 / h_{i+1}^2)(alpha_{i-1} / alpha_{i+1}) x_{i+1}
            + ((h_{i+1}^2 - h_i^2) / h_{i+1}^2)(alpha_{i-1} / alpha_i) x_i
            - (h_i (h_i + h_{i+1}) / h_{i+1}) alpha_{i-1} eps(x_i, t_i)

and its exact inverse (BELM inversion), for ``i = 1 .. N-1``, solves the same equation for
``x_{i+1}``. Both start with a plain DDIM step (sampling ``x_N -> x_{N-1}``, inversion
``x_0 -> x_1``). Because the recursion links three states, BELM inversion returns the pair
``(x_N, x_{N-1})``; sampling from that pair reconstructs ``x_0`` to round-off. Sampling from
``x_N`` alone (random-noise ablation, or DDIM) takes the plain DDIM first step instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "DiffusionGrid",
    "InversionResult",
    "make_grid",
    "ddim_invert",
    "ddim_sample",
    "belm_invert",
    "belm_sample",
    "invert",
    "sample",
    "unet_eps_fn",
]

# eps_fn(x [B, C, h, w], t (int training timestep), step (int state index i)) -> eps [B, C, h, w]
EpsFn = Callable[[torch.Tensor, int, int], torch.Tensor]

INVERSION_KINDS = ("ddim", "belm")


@dataclass(frozen=True)
class DiffusionGrid:
    """Timesteps and noise levels of an ``N``-step deterministic grid.

    Attributes:
        timesteps: long [N + 1]; ``timesteps[i]`` is the UNet timestep of state ``i`` (entry 0 is
            unused and set to -1).
        alphas: float [N + 1], ``alpha_i = sqrt(abar_i)``, ``alphas[0] = 1``.
        sigmas: float [N + 1], ``sigma_i = sqrt(1 - abar_i)``, ``sigmas[0] = 0``.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel()) - 1

    def h(self, i: int) -> torch.Tensor:
        """``h_i = sigma_i / alpha_i - sigma_{i-1} / alpha_{i-1}`` for ``1 <= i <= N``."""
        ratio = self.sigmas / self.alphas
        return ratio[i] - ratio[i - 1]


@dataclass
class InversionResult:
    """Output of an inversion: the noise ``x_N`` and, for BELM, the state ``x_{N-1}``.

    Attributes:
        noise: [B, C, h, w] the inverted latent ``x_N``.
        penultimate: [B, C, h, w] ``x_{N-1}`` (BELM), or None (DDIM / random noise).
    """

    noise: torch.Tensor
    penultimate: Optional[torch.Tensor] = None


def make_grid(scheduler, num_steps: int, dtype: torch.dtype = torch.float64) -> DiffusionGrid:
    """Build the grid from a diffusers scheduler's ``alphas_cumprod`` and its DDIM timesteps.

    The timesteps are those of ``DDIMScheduler.set_timesteps(num_steps)`` built from the same
    config (so the spacing follows ``timestep_spacing`` / ``steps_offset``).
    """
    from diffusers import DDIMScheduler

    if num_steps < 2:
        raise ValueError(f"CALIBRATION.NUM_INFERENCE_STEPS must be >= 2, got {num_steps}")
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    ts = torch.as_tensor(ddim.timesteps, dtype=torch.long).flip(0)  # ascending t_1 .. t_N
    abar = ddim.alphas_cumprod.to(torch.float64)[ts]
    abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
    if not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError("scheduler alphas_cumprod must decrease along the chosen timesteps")
    timesteps = torch.cat([torch.tensor([-1]), ts])
    return DiffusionGrid(timesteps, abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype))


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, grid: DiffusionGrid, src: int, dst: int):
    """Deterministic DDIM transfer of ``x`` from level ``src`` to ``dst`` with noise ``eps``."""
    a, s = grid.alphas.to(x), grid.sigmas.to(x)
    x0 = (x - s[src] * eps) / a[src]
    return a[dst] * x0 + s[dst] * eps


def _eps(eps_fn: EpsFn, x: torch.Tensor, grid: DiffusionGrid, i: int) -> torch.Tensor:
    return eps_fn(x, int(grid.timesteps[i]), i)


def ddim_invert(eps_fn: EpsFn, x0: torch.Tensor, grid: DiffusionGrid) -> InversionResult:
    """DDIM inversion ``x_0 -> x_N`` (approximate: ``eps`` is taken at the lower state)."""
    x = x0
    for i in range(1, grid.num_steps + 1):
        x = _ddim_move(x, _eps(eps_fn, x, grid, i), grid, i - 1, i)
    return InversionResult(noise=x)


def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, grid: DiffusionGrid) -> torch.Tensor:
    """Deterministic DDIM sampling ``x_N -> x_0``; returns ``x_0`` [B, C, h, w]."""
    x = noise
    for i in range(grid.num_steps, 0, -1):
        x = _ddim_move(x, _eps(eps_fn, x, grid, i), grid, i, i - 1)
    return x


def _belm_coefficients(grid: DiffusionGrid, i: int, like: torch.Tensor):
    """Coefficients ``(c_next, c_cur, c_eps)`` of ``x_{i-1} = c_next x_{i+1} + c_cur x_i
    - c_eps eps(x_i)`` for ``1 <= i <= N-1``."""
    a = grid.alphas.to(like)
    h_i, h_n = grid.h(i).to(like), grid.h(i + 1).to(like)
    c_next = (h_i**2 / h_n**2) * (a[i - 1] / a[i + 1])
    c_cur = ((h_n**2 - h_i**2) / h_n**2) * (a[i - 1] / a[i])
    c_eps = (h_i * (h_i + h_n) / h_n) * a[i - 1]
    return c_next, c_cur, c_eps


def belm_invert(eps_fn: EpsFn, x0: torch.Tensor, grid: DiffusionGrid) -> InversionResult:
    """Exact BELM inversion ``x_0 -> (x_N, x_{N-1})``: a DDIM first step, then the inverse of
    O-BELM sampling ``x_{i+1} = (x_{i-1} - c_cur x_i + c_eps eps(x_i)) / c_next``."""
    prev, cur = x0, _ddim_move(x0, _eps(eps_fn, x0, grid, 1), grid, 0, 1)
    for i in range(1, grid.num_steps):
        c_next, c_cur, c_eps = _belm_coefficients(grid, i, cur)
        nxt = (prev - c_cur * cur + c_eps * _eps(eps_fn, cur, grid, i)) / c_next
        prev, cur = cur, nxt
    return InversionResult(noise=cur, penultimate=prev)


def belm_sample(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    grid: DiffusionGrid,
    penultimate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """O-BELM sampling ``x_N -> x_0``. ``x_{N-1}`` is ``penultimate`` when given (exact
    reconstruction of a BELM inversion), else a plain DDIM step from ``x_N``."""
    n = grid.num_steps
    nxt = noise
    if penultimate is None:
        cur = _ddim_move(noise, _eps(eps_fn, noise, grid, n), grid, n, n - 1)
    else:
        if penultimate.shape != noise.shape:
            raise ValueError(
                f"penultimate state shape {tuple(penultimate.shape)} != noise shape "
                f"{tuple(noise.shape)}"
            )
        cur = penultimate
    for i in range(n - 1, 0, -1):
        c_next, c_cur, c_eps = _belm_coefficients(grid, i, cur)
        prev = c_next * nxt + c_cur * cur - c_eps * _eps(eps_fn, cur, grid, i)
        nxt, cur = cur, prev
    return cur


def _check_kind(kind: str, key: str) -> str:
    kind = kind.lower()
    if kind not in INVERSION_KINDS:
        raise ValueError(f"CALIBRATION.{key} must be one of {INVERSION_KINDS}, got {kind!r}")
    return kind


def invert(kind: str, eps_fn: EpsFn, x0: torch.Tensor, grid: DiffusionGrid) -> InversionResult:
    """Dispatch on ``CALIBRATION.INVERSION`` ("ddim" or "belm")."""
    fn = {"ddim": ddim_invert, "belm": belm_invert}[_check_kind(kind, "INVERSION")]
    return fn(eps_fn, x0, grid)


def sample(kind: str, eps_fn: EpsFn, start: InversionResult, grid: DiffusionGrid) -> torch.Tensor:
    """Dispatch on ``CALIBRATION.SAMPLER`` ("ddim" or "belm"); returns ``x_0``."""
    if _check_kind(kind, "SAMPLER") == "ddim":
        return ddim_sample(eps_fn, start.noise, grid)
    return belm_sample(eps_fn, start.noise, grid, start.penultimate)


def unet_eps_fn(
    unet,
    context: torch.Tensor,
    uncond_context: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    on_step: Optional[Callable[[int, bool], None]] = None,
) -> EpsFn:
    """An ``eps_fn`` over a diffusers ``UNet2DConditionModel``.

    Args:
        unet: epsilon-predicting conditional UNet.
        context: [B, L, D] encoder hidden states of the prompts.
        uncond_context: [B, L, D] empty-prompt states, required when ``guidance_scale != 1``.
        guidance_scale: classifier-free guidance weight ``w``: ``eps_u + w (eps_c - eps_u)``.
        on_step: called as ``on_step(step_index, conditional)`` before every UNet call (used to
            switch attention capture on for the conditional pass of chosen steps only).
    """
    if guidance_scale != 1.0 and uncond_context is None:
        raise ValueError("CALIBRATION.GUIDANCE_SCALE != 1 needs an unconditional context")

    def eps_fn(x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        x_in = x.to(unet.dtype)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if on_step is not None:
            on_step(step, True)
        eps_c = unet(x_in, tt, encoder_hidden_states=context.to(unet.dtype)).sample
        if guidance_scale == 1.0:
            return eps_c.to(x.dtype)
        if on_step is not None:
            on_step(step, False)
        eps_u = unet(x_in, tt, encoder_hidden_states=uncond_context.to(unet.dtype)).sample
        return (eps_u + guidance_scale * (eps_c - eps_u)).to(x.dtype)

    return eps_fn
