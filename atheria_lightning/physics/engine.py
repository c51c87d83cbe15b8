"""One Lindblad-Euler step of the QCA state and a whole rollout with its history."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from atheria_lightning.physics.noise import apply_noise
from atheria_lightning.physics.state import normalize


def episode_generator(seed: int, episode: int, device: torch.device | str = "cpu", rank: int = 0) -> torch.Generator:
    """A generator whose stream is a pure function of ``(seed, episode, rank)``.

    Hashing (rather than ``seed + episode``) keeps neighbouring seeds from sharing episodes. ``rank`` separates the
    universes of DDP processes; with one process the stream depends on ``(seed, episode)`` alone.
    """
    digest = hashlib.blake2b(f"{seed}:{episode}:{rank}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def to_channels(psi: torch.Tensor) -> torch.Tensor:
    """Complex ``(B, H, W, d)`` to the operator's real input ``cat(real, imag)``: ``(B, 2d, H, W)``.

    The permute of a contiguous ``(B, H, W, 2d)`` tensor is already channels_last in memory, which cuDNN prefers.
    """
    return torch.cat([psi.real, psi.imag], dim=-1).permute(0, 3, 1, 2)


def from_channels(out: torch.Tensor) -> torch.Tensor:
    """The operator's real output ``(B, 2d, H, W)`` read back as a complex delta ``(B, H, W, d)`` in float32."""
    real, imag = out.float().permute(0, 2, 3, 1).chunk(2, dim=-1)  # each (B, H, W, d)
    return torch.complex(real, imag)


def lindblad_step(operator: nn.Module, psi: torch.Tensor, gamma: float, memory: Any = None) -> tuple[torch.Tensor, Any]:
    """``psi' = normalize(psi + A(psi) - gamma * psi)``: an Euler step of the Lindblad-style equation.

    ``A`` is the operator's output read as a complex delta; a ``multiplicative`` operator (UNET_UNITARY) has its
    output multiplied into psi first. A ``recurrent`` operator takes and returns its memory (ConvLSTM state).
    """
    x = to_channels(psi)  # (B, 2d, H, W)
    if getattr(operator, "recurrent", False):
        out, memory = operator(x, memory)
    else:
        out = operator(x)
    delta = from_channels(out)  # (B, H, W, d)
    if getattr(operator, "multiplicative", False):
        delta = delta * psi
    return normalize(psi + delta - gamma * psi), memory


@dataclass
class RolloutResult:
    """The final state (with its graph) and detached snapshots along the way, first and last included."""

    final: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)


def rollout(
    operator: nn.Module,
    psi0: torch.Tensor,
    steps: int,
    gamma: float,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    history_states: int = 10,
) -> RolloutResult:
    """Evolve ``psi0`` for ``steps`` steps with noise at level ``noise`` after each step.

    Keeps about ``history_states`` snapshots (every ``steps // history_states`` steps, plus the first and the last).
    The recurrent memory starts empty, so it never leaks from one episode into the next.
    """
    every = max(1, steps // max(1, history_states))
    psi, memory = psi0, None
    history = [psi0.detach()]
    for t in range(1, steps + 1):
        psi, memory = lindblad_step(operator, psi, gamma, memory)
        psi = apply_noise(psi, noise, generator)
        if t % every == 0 or t == steps:
            history.append(psi.detach())
    return RolloutResult(final=psi, history=history)
