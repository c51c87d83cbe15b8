"""Environment noise (phase and bit flips) without host syncs, and the noise curriculum."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from atheria_lightning.physics.state import multiply_pairs

#: Below this level the noise is switched off entirely, as in the original.
NOISE_FLOOR = 1e-3
#: Probability, per step, that a bit-flip event happens at all.
BIT_FLIP_PROBABILITY = 0.2
#: A bit flip touches this fraction of the phase-flip rate.
BIT_FLIP_RATE_FACTOR = 0.1


def noise_level(episode: int, max_noise: float = 0.05, ramp_episodes: int = 2000) -> float:
    """The curriculum: ``min(max_noise, max_noise * episode / ramp_episodes)``, and 0 below ``NOISE_FLOOR``."""
    level = max_noise if ramp_episodes <= 0 else min(max_noise, max_noise * episode / ramp_episodes)
    return level if level >= NOISE_FLOOR else 0.0


def _turn_phases(psi: torch.Tensor, cells: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """In the ``cells`` (a ``(B, H, W, 1)`` mask), multiply each amplitude by ``exp(2*pi*i*turns)``.

    torch.where instead of boolean indexing: indexing would sync the host to size the result.
    """
    angle = turns * (2 * math.pi)
    return torch.where(cells, psi * torch.polar(torch.ones_like(angle), angle), psi)


def _flip_signs(psi: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """In the ``cells`` (a ``(B, H, W, 1)`` mask), invert the sign of every amplitude."""
    return torch.where(cells, -psi, psi)


class NoiseDraws(NamedTuple):
    """The uniform draws of one noise step, in the order :func:`draw_noise` makes them."""

    phase_cells: torch.Tensor  # (B, H, W): which cells turn their phase
    phase_angles: torch.Tensor  # (B, H, W, d): by how much, as a fraction of a full turn
    bit_gate: torch.Tensor  # (): whether a bit-flip event happens at all this step
    bit_cells: torch.Tensor  # (B, H, W): which cells flip their sign


class NoiseRates(NamedTuple):
    """The per-cell rates of one noise level, as float32 device scalars: the same values in every step and episode
    of a level, and inputs (not constants) for a compiled step, so a new level compiles nothing new."""

    phase: torch.Tensor
    bit: torch.Tensor


def noise_rates(level: float, device: torch.device | str) -> NoiseRates:
    """The phase-flip rate ``level`` and the bit-flip rate ``0.1 * level``, as float32: the precision of the uniform
    draws they are compared with."""
    rates = torch.tensor([level, BIT_FLIP_RATE_FACTOR * level], dtype=torch.float32).to(device, non_blocking=True)
    return NoiseRates(rates[0], rates[1])


def draw_noise(psi: torch.Tensor, generator: torch.Generator | None = None) -> NoiseDraws:
    """The random numbers of one noise step on ``psi``'s device: which cells turn their phase and by how much,
    whether a bit-flip event happens, which cells flip; drawn in that order."""
    cells, device = psi.shape[:3], psi.device
    return NoiseDraws(
        torch.rand(cells, generator=generator, device=device),
        torch.rand(psi.shape, generator=generator, device=device),
        torch.rand((), generator=generator, device=device),
        torch.rand(cells, generator=generator, device=device),
    )


def apply_drawn_noise(psi: torch.Tensor, rates: NoiseRates, draws: NoiseDraws) -> torch.Tensor:
    """One noise step from its draws: a pure function of its tensors, so it can be compiled and captured."""
    psi = _turn_phases(psi, (draws.phase_cells < rates.phase).unsqueeze(-1), draws.phase_angles)
    return _flip_signs(psi, (draws.bit_cells < rates.bit).unsqueeze(-1) & (draws.bit_gate < BIT_FLIP_PROBABILITY))


def apply_drawn_noise_pairs(pairs: torch.Tensor, rates: NoiseRates, draws: NoiseDraws) -> torch.Tensor:
    """:func:`apply_drawn_noise` of a state held as real pairs, ``torch.view_as_real(psi)``: ``(B, H, W, d, 2)``.

    The phase turn is the complex product by ``(cos, sin)`` written out: real arithmetic only, which inductor fuses
    (it has no code for complex tensors).
    """
    angle = draws.phase_angles * (2 * math.pi)
    turned = multiply_pairs(pairs, torch.stack([angle.cos(), angle.sin()], dim=-1))
    cells = (draws.phase_cells < rates.phase)[..., None, None]
    pairs = torch.where(cells, turned, pairs)
    flips = ((draws.bit_cells < rates.bit) & (draws.bit_gate < BIT_FLIP_PROBABILITY))[..., None, None]
    return torch.where(flips, -pairs, pairs)
