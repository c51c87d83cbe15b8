"""``torch.compile`` of the operator or of the whole step, optionally captured as CUDA graphs, with a fallback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from atheria_lightning.accel.checkpoint import Runner, trainable_weights
from atheria_lightning.physics.engine import noisy_step, noisy_step_pairs, to_channels
from atheria_lightning.physics.noise import NoiseDraws, NoiseRates

#: Accepted values of ``model.compile``: the plain operator, ``torch.compile`` with inductor, or the same replayed as
#: CUDA graphs (``reduce-overhead``, inductor's CUDA-graph trees). Dynamo's plain ``cudagraphs`` backend is not
#: offered: on an H100 (torch 2.11) it gave wrong gradients for an operator called many times before one backward,
#: which is what a rollout does (benchmarks/RESULTS.md).
COMPILE_MODES = ("off", "default", "reduce-overhead")
#: The modes that replay captured CUDA graphs: they need a CUDA device.
CAPTURE_MODES = ("reduce-overhead",)
#: Accepted values of ``model.compile_scope``: what ``model.compile`` compiles, the operator alone or the whole step
#: (operator, Euler update, normalisation and noise; one CUDA graph per step with ``reduce-overhead``).
COMPILE_SCOPES = ("operator", "step")

#: Exceptions that pass through a compiled call instead of making it fall back to the plain computation: out of
#: memory (too big whichever path runs: the user must hear it).
_NOT_FAILURES: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


class _Compiled(Runner):
    """What both compile scopes share: ``torch.compile`` of ``target``, and the fallback to the plain computation
    (one warning) when compiling or capturing fails, on a call or at the probe. ``compiled`` is None once it has."""

    def __init__(self, operator: nn.Module, mode: str, target: Callable[..., Any], checkpoint_every: int = 0) -> None:
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(COMPILE_MODES[1:])}")
        super().__init__(operator, checkpoint_every)
        self.mode = mode
        self.compiled: Callable[..., Any] | None = torch.compile(target, mode=mode)
        self._probed = False

    def _run(self, plain: Callable[..., Any], *args: Any) -> Any:
        """The compiled target on ``args``; ``plain`` (the same computation uncompiled) once compiling has failed."""
        if self.compiled is None:
            return plain(*args)
        try:
            return self.compiled(*args)
        except _NOT_FAILURES:
            raise
        except Exception as err:  # any failure to compile or capture: the plain computation gives the same numbers
            self._fall_back(err)
            return plain(*args)

    def _probe(self, forward_and_backward: Callable[[Callable[..., Any]], None]) -> None:
        """Once, with gradients on: ``forward_and_backward(compiled)``, so that compiling fails here, if it does."""
        if self._probed or self.compiled is None or not torch.is_grad_enabled():
            return
        try:
            forward_and_backward(self.compiled)
            self._probed = True
        except _NOT_FAILURES:
            raise
        except Exception as err:  # any failure to compile or capture: the plain computation gives the same numbers
            self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        self.compiled = None
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        warnings.warn(
            f"model.compile={self.mode!r} failed ({type(err).__name__}: {first_line}); running the plain operator",
            stacklevel=4,
        )


def _with_input_gradient(x: torch.Tensor) -> torch.Tensor:
    """The first step's input carries no gradient; asking for one (a few kFLOP) lets that step reuse the graph of
    all the others instead of compiling a second one, which takes as long as the first."""
    return x.detach().requires_grad_() if torch.is_grad_enabled() and not x.requires_grad else x


class CompiledOperator(_Compiled):
    """The operator behind ``torch.compile``, falling back to the plain operator (one warning) if compiling fails.

    Only the operator is compiled (``model.compile_scope: operator``); :class:`CompiledStep` compiles the whole step.
    An instance is an operator itself (called on ``(B, 2d, H, W)`` channels, with the plain one's flags), and the
    runner of a rollout whose steps call it. Its parameters stay those of ``operator`` (nothing is copied), so the
    optimizer and the checkpoints see the plain module. :meth:`probe` (run before a rollout's first step) compiles
    the forward and the backward once, so that a failure to compile or capture shows there, not inside
    ``loss.backward()``.

    Args:
        operator: The Law M operator.
        mode: ``default`` or ``reduce-overhead`` (see :data:`COMPILE_MODES`).
        checkpoint_every: Steps per checkpointed segment, 0 for none (see :class:`Runner`).
    """

    def __init__(self, operator: nn.Module, mode: str, checkpoint_every: int = 0) -> None:
        super().__init__(operator, mode, operator, checkpoint_every)
        self.multiplicative = getattr(operator, "multiplicative", False)
        self.recurrent = getattr(operator, "recurrent", False)

    def __call__(self, x: torch.Tensor, *memory: Any) -> Any:
        return self._run(self.operator, _with_input_gradient(x), *memory)

    def step(
        self, psi: torch.Tensor, memory: Any, gamma: float, rates: NoiseRates | None, draws: NoiseDraws | None
    ) -> tuple[torch.Tensor, Any]:
        """:func:`~atheria_lightning.physics.engine.noisy_step` with the compiled operator."""
        return noisy_step(self, psi, memory, gamma, rates, draws)

    def prepare(self, psi0: torch.Tensor, gamma: float, rates: NoiseRates | None) -> None:
        self.probe(to_channels(psi0))

    def probe(self, x: torch.Tensor) -> None:
        """Once, with gradients on: a forward and backward on ``x`` (the first step's input), to compile both."""

        def forward_and_backward(compiled: Callable[..., Any]) -> None:
            probe = x.detach().requires_grad_()
            out = compiled(probe, None)[0] if self.recurrent else compiled(probe)
            # autograd.grad, not backward: the probe must leave no gradient in the parameters.
            torch.autograd.grad(out.float().sum(), [probe, *trainable_weights(self.operator)], allow_unused=True)

        self._probe(forward_and_backward)


class CompiledStep(_Compiled):
    """The whole step (operator, Euler update, normalisation, noise) behind ``torch.compile``.

    The plain step launches its own operations one by one from Python, and a rollout at one universe per episode is
    bound by such launches ("The compiled step in real arithmetic" in ``benchmarks/RESULTS.md``). What is compiled is
    :func:`~atheria_lightning.physics.engine.noisy_step_pairs`, the step in real arithmetic on
    ``torch.view_as_real(psi)`` (a view: nothing is copied), which inductor fuses into a few kernels; with
    ``reduce-overhead`` each step is one CUDA graph. The noise comes in as drawn tensors and the noise rates as
    device scalars, so the graph is the same for every step, level and episode. Falls back to the plain step, with
    one warning, if compiling fails.

    Args:
        operator: The Law M operator.
        mode: ``default`` or ``reduce-overhead`` (see :data:`COMPILE_MODES`).
        checkpoint_every: Steps per checkpointed segment, 0 for none (see :class:`Runner`).
    """

    def __init__(self, operator: nn.Module, mode: str, checkpoint_every: int = 0) -> None:
        super().__init__(operator, mode, noisy_step_pairs, checkpoint_every)

    def step(
        self, psi: torch.Tensor, memory: Any, gamma: float, rates: NoiseRates | None, draws: NoiseDraws | None
    ) -> tuple[torch.Tensor, Any]:
        """:func:`~atheria_lightning.physics.engine.noisy_step` of the operator, compiled (as ``noisy_step_pairs``)."""
        pairs = torch.view_as_real(_with_input_gradient(psi))
        pairs, memory = self._run(noisy_step_pairs, self.operator, pairs, memory, gamma, rates, draws)
        return torch.view_as_complex(pairs), memory

    def prepare(self, psi0: torch.Tensor, gamma: float, rates: NoiseRates | None) -> None:
        """Once, with gradients on: a forward and backward of one step from ``psi0``, to compile both."""

        def forward_and_backward(compiled: Callable[..., Any]) -> None:
            psi = psi0.detach().requires_grad_()
            draws = None
            if rates is not None:  # zeros: the shapes and devices of real draws, without drawing from the generator
                cells = torch.zeros(psi0.shape[:3], device=psi0.device)
                draws = NoiseDraws(cells, torch.zeros(psi0.shape, device=psi0.device), cells[0, 0, 0], cells)
            out, _ = compiled(self.operator, torch.view_as_real(psi), None, gamma, rates, draws)
            torch.autograd.grad(out.pow(2).sum(), [psi, *trainable_weights(self.operator)], allow_unused=True)

        self._probe(forward_and_backward)
