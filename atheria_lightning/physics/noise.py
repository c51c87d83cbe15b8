"""Environment noise (phase and bit flips) without host syncs, and the noise curriculum."""

from __future__ import annotations

import math

import torch

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


def _cell_mask(psi: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """A boolean ``(B, H, W, 1)`` mask selecting about ``rate`` of the cells."""
    return torch.rand(psi.shape[:3], generator=generator, device=psi.device).unsqueeze(-1) < rate


def phase_flip(psi: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiply each amplitude of about ``rate`` of the cells by a random phase ``exp(i*theta)``; |psi| is kept."""
    mask = _cell_mask(psi, rate, generator)
    angle = torch.rand(psi.shape, generator=generator, device=psi.device) * (2 * math.pi)
    # torch.where instead of boolean indexing: indexing would sync the host to size the result.
    return torch.where(mask, psi * torch.polar(torch.ones_like(angle), angle), psi)


def bit_flip(
    psi: torch.Tensor,
    rate: float,
    generator: torch.Generator | None = None,
    gate: torch.Tensor | bool = True,
) -> torch.Tensor:
    """Invert the sign of about ``rate`` of the cells, where ``gate`` (a device boolean) is true."""
    mask = _cell_mask(psi, rate, generator) & gate
    return torch.where(mask, -psi, psi)


def apply_noise(psi: torch.Tensor, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of environment noise: a phase flip at ``level``, and with probability 0.2 a bit flip at
    ``0.1 * level``. The 20% draw stays on the device, so the step never waits for the GPU."""
    if level <= 0.0:  # a Python float from the curriculum, not a tensor: no sync
        return psi
    psi = phase_flip(psi, level, generator)
    gate = torch.rand((), generator=generator, device=psi.device) < BIT_FLIP_PROBABILITY
    return bit_flip(psi, BIT_FLIP_RATE_FACTOR * level, generator, gate)
