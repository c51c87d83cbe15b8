"""One Lindblad-Euler step of the QCA state, and a rollout of such steps with environment noise."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atheria_lightning.physics.noise import (
    NoiseDraws,
    NoiseRates,
    apply_drawn_noise,
    apply_drawn_noise_pairs,
    draw_noise,
    noise_rates,
)
from atheria_lightning.physics.state import multiply_pairs, normalize, normalize_pairs


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
    """Complex ``(B, H, W, d)`` to the operator's real input ``cat(real, imag)``: ``(B, 2d, H, W)``."""
    return pairs_to_channels(torch.view_as_real(psi))


def from_channels(out: torch.Tensor) -> torch.Tensor:
    """The operator's real output ``(B, 2d, H, W)`` read back as a complex delta ``(B, H, W, d)`` in float32."""
    return torch.view_as_complex(channels_to_pairs(out).contiguous())


def pairs_to_channels(pairs: torch.Tensor) -> torch.Tensor:
    """:func:`to_channels` of a state held as real pairs ``(B, H, W, d, 2)``: all real parts, then all imaginary.

    The permute of the contiguous ``(B, H, W, 2d)`` copy is already channels_last in memory, which cuDNN prefers.
    """
    batch, height, width, d_state, _ = pairs.shape
    return pairs.transpose(-1, -2).reshape(batch, height, width, 2 * d_state).permute(0, 3, 1, 2)


def channels_to_pairs(out: torch.Tensor) -> torch.Tensor:
    """:func:`from_channels` as real pairs: ``(B, 2d, H, W)`` to ``(B, H, W, d, 2)`` in float32 (a view)."""
    return out.float().permute(0, 2, 3, 1).unflatten(-1, (2, out.shape[1] // 2)).transpose(-1, -2)


def _call_operator(operator: Callable[..., Any], x: torch.Tensor, memory: Any) -> tuple[torch.Tensor, Any]:
    """The operator's output on ``x``, and its memory: a ``recurrent`` one takes and returns it."""
    if getattr(operator, "recurrent", False):
        return operator(x, memory)
    return operator(x), memory


def lindblad_step(operator: nn.Module, psi: torch.Tensor, gamma: float, memory: Any = None) -> tuple[torch.Tensor, Any]:
    """``psi' = normalize(psi + A(psi) - gamma * psi)``: an Euler step of the Lindblad-style equation.

    ``A`` is the operator's output read as a complex delta; a ``multiplicative`` operator (UNET_UNITARY) has its
    output multiplied into psi first. A ``recurrent`` operator takes and returns its memory (ConvLSTM state).
    """
    out, memory = _call_operator(operator, to_channels(psi), memory)  # (B, 2d, H, W)
    delta = from_channels(out)  # (B, H, W, d)
    if getattr(operator, "multiplicative", False):
        delta = delta * psi
    return normalize(psi + delta - gamma * psi), memory


def noisy_step(
    operator: Callable[..., Any],
    psi: torch.Tensor,
    memory: Any,
    gamma: float,
    rates: NoiseRates | None,
    draws: NoiseDraws | None,
) -> tuple[torch.Tensor, Any]:
    """One step of a rollout: :func:`lindblad_step`, then the noise of ``draws`` (none when ``draws`` is None).

    A pure function of its tensors (the random numbers come in ``draws``); ``model.compile_scope: step`` compiles
    and captures the same step whole, written in real arithmetic (:func:`noisy_step_pairs`).
    """
    psi, memory = lindblad_step(operator, psi, gamma, memory)
    if draws is not None:
        assert rates is not None
        psi = apply_drawn_noise(psi, rates, draws)
    return psi, memory


def noisy_step_pairs(
    operator: Callable[..., Any],
    pairs: torch.Tensor,
    memory: Any,
    gamma: float,
    rates: NoiseRates | None,
    draws: NoiseDraws | None,
) -> tuple[torch.Tensor, Any]:
    """:func:`noisy_step` of a state held as real pairs, ``torch.view_as_real(psi)``: ``(B, H, W, d, 2)``.

    Real arithmetic only, so that inductor fuses the Euler update, the normalisation and the noise into a few
    kernels; it generates no code for complex tensors and runs PyTorch's own kernel for each complex operation (on
    CUDA some of them have failed to compile at all: pytorch/pytorch#185396, #188718). The same numbers as
    :func:`noisy_step` up to rounding (``tests/test_fast_paths.py``). Returns contiguous pairs, which
    ``torch.view_as_complex`` reads back.
    """
    out, memory = _call_operator(operator, pairs_to_channels(pairs), memory)
    delta = channels_to_pairs(out)
    if getattr(operator, "multiplicative", False):
        delta = multiply_pairs(delta, pairs)
    pairs = normalize_pairs(pairs + delta - gamma * pairs)
    if draws is not None:
        assert rates is not None
        pairs = apply_drawn_noise_pairs(pairs, rates, draws)
    return pairs.contiguous(), memory


#: One step of a rollout, noise included: ``step(psi, memory, gamma, rates, draws) -> (psi, memory)``.
#: :func:`noisy_step` with its operator bound is one; ``atheria_lightning.accel`` has compiled ones.
Step = Callable[[torch.Tensor, Any, float, NoiseRates | None, NoiseDraws | None], tuple[torch.Tensor, Any]]


def evolve(
    step: Step,
    psi: torch.Tensor,
    memory: Any,
    generator: torch.Generator | None,
    *,
    steps: int,
    gamma: float,
    rates: NoiseRates | None,
) -> tuple[torch.Tensor, Any]:
    """``steps`` steps of ``step`` from ``psi`` and the operator's ``memory``: the state and the memory after them.

    Each step's noise is drawn from ``generator`` just before the step (none when ``rates`` is None), so that a
    compiled step takes it as input; the generator feeds nothing else, so its stream is the one a step drawing its
    own noise after the update would use.
    """
    for _ in range(steps):
        draws = draw_noise(psi, generator) if rates is not None else None
        psi, memory = step(psi, memory, gamma, rates, draws)
    return psi, memory


class Stepper:
    """Runs the steps of a rollout; this base runs them as the maths has them: :func:`noisy_step` of ``operator``,
    one after the other.

    ``atheria_lightning.accel`` builds its compiled, captured and checkpointed runners on it: one changes how a step
    runs (:meth:`step`), another how the steps are strung together (:meth:`advance`). Each must give what this one
    gives, and leave ``generator`` where :func:`evolve` leaves it.
    """

    def __init__(self, operator: Callable[..., Any]) -> None:
        self.operator = operator

    def step(
        self, psi: torch.Tensor, memory: Any, gamma: float, rates: NoiseRates | None, draws: NoiseDraws | None
    ) -> tuple[torch.Tensor, Any]:
        """One step of the rollout: :func:`noisy_step` of the operator."""
        return noisy_step(self.operator, psi, memory, gamma, rates, draws)

    def advance(
        self,
        psi: torch.Tensor,
        memory: Any,
        generator: torch.Generator | None,
        *,
        steps: int,
        gamma: float,
        rates: NoiseRates | None,
    ) -> tuple[torch.Tensor, Any]:
        """``steps`` steps on from ``psi`` and the operator's ``memory``: the state and the memory after them."""
        return evolve(self.step, psi, memory, generator, steps=steps, gamma=gamma, rates=rates)


@dataclass
class RolloutResult:
    """What a rollout gives: the final state, with its graph for the backward pass."""

    final: torch.Tensor


def rollout(
    stepper: Stepper,
    psi0: torch.Tensor,
    steps: int,
    gamma: float,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> RolloutResult:
    """Evolve ``psi0`` for ``steps`` steps with noise at level ``noise`` after each step.

    ``stepper`` runs the steps: ``Stepper(operator)`` as the maths has it, or one of
    ``atheria_lightning.accel``'s. The recurrent memory starts empty, so it never leaks from one
    episode into the next.
    """
    rates = noise_rates(noise, psi0.device) if noise > 0.0 else None  # once per rollout: one host-to-device copy
    psi, _ = stepper.advance(psi0, None, generator, steps=steps, gamma=gamma, rates=rates)
    return RolloutResult(final=psi)
