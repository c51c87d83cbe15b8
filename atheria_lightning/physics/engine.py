"""One Lindblad-Euler step of the QCA state and a whole rollout with its history."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from atheria_lightning.physics.noise import (
    NoiseDraws,
    NoiseRates,
    apply_drawn_noise,
    apply_drawn_noise_pairs,
    draw_noise,
    noise_rates,
)
from atheria_lightning.physics.state import multiply_pairs, normalize, normalize_pairs

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


@dataclass
class RolloutResult:
    """The final state (with its graph) and detached snapshots along the way, first and last included."""

    final: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)


def rollout(
    operator: Callable[..., Any],
    psi0: torch.Tensor,
    steps: int,
    gamma: float,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    history_states: int = 10,
    checkpoint_every: int = 0,
) -> RolloutResult:
    """Evolve ``psi0`` for ``steps`` steps with noise at level ``noise`` after each step.

    Keeps about ``history_states`` snapshots (every ``steps // history_states`` steps, plus the first and the last).
    The recurrent memory starts empty, so it never leaks from one episode into the next.

    With ``checkpoint_every = k > 0`` (and gradients on), only the state at every k-th step is kept for the backward
    pass; each segment of k steps is recomputed during the backward, with the very same noise draws. The result and
    the gradients are those of the plain rollout, for one more forward pass (the first one builds no graph). The
    memory falls from ``steps`` steps of activations to ``steps / k`` states plus k steps of activations. The
    gradients reach the operator's parameters (``operator`` a module or a compiled one; see :class:`_Segment`).
    """
    every = max(1, steps // max(1, history_states))
    segment = checkpoint_every if checkpoint_every > 0 and torch.is_grad_enabled() else steps
    psi, memory = psi0, None
    history = [psi0.detach()]
    rates = noise_rates(noise, psi0.device) if noise > 0.0 else None  # once per rollout: one host-to-device copy
    with weight_cast_cache(psi0.device.type):
        # Here, not inside a checkpointed segment, whose recompute would not match; under the same autocast state as
        # the steps, so that they reuse what it compiled.
        if isinstance(operator, CompiledOperator):
            operator.probe(to_channels(psi0))
        elif isinstance(operator, CompiledStep):
            operator.probe(psi0, gamma, rates)
        weights = _trainable_weights(operator) if segment < steps else []
        for first in range(1, steps + 1, segment):
            last = min(first + segment - 1, steps)
            evolve = partial(
                _evolve, operator, first=first, last=last, steps=steps, every=every, gamma=gamma, rates=rates
            )
            if segment < steps:
                psi, memory, snapshots = _checkpointed(evolve, psi, memory, generator, weights)
            else:
                psi, memory, snapshots = evolve(psi, memory, generator)
            history.extend(snapshots)
    return RolloutResult(final=psi, history=history)


def _trainable_weights(operator: Callable[..., Any]) -> list[torch.Tensor]:
    """The parameters of ``operator`` (a module, or one behind :class:`CompiledOperator` or :class:`CompiledStep`)
    that take gradients: the inputs through which a checkpointed segment's gradients reach them."""
    module = operator.operator if isinstance(operator, _Compiled) else operator
    if not isinstance(module, nn.Module):  # its weights would get no gradient from a checkpointed segment
        raise TypeError(f"checkpoint_every needs the operator as an nn.Module, not {type(operator).__name__}")
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


@contextlib.contextmanager
def weight_cast_cache(device_type: str) -> Iterator[None]:
    """Under mixed precision, cast each weight to the low precision once per rollout, not once per step.

    Lightning's mixed-precision plugin runs the training step under ``torch.autocast(..., cache_enabled=False)``.
    Without autocast's cache every step casts every weight again and keeps that copy for the backward pass: a
    rollout of 100 steps held 100 half-precision copies of the weights, 1.3 GiB more for the standard model (7 M
    weights) than with the cache. Inside such a context this enters autocast again, with the same dtype and the
    cache on; the copies are the same numbers, and the cache is emptied when the outermost autocast context ends.
    Elsewhere (no autocast, or its cache already on) it does nothing.
    """
    dtype = next((dtype for _, dtype, cache in _autocast_state((device_type,)) if not cache), None)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, cache_enabled=True):
        yield


def _evolve(
    operator: Callable[..., Any],
    psi: torch.Tensor,
    memory: Any,
    generator: torch.Generator | None,
    *,
    first: int,
    last: int,
    steps: int,
    every: int,
    gamma: float,
    rates: NoiseRates | None,
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    """Steps ``first..last`` (1-based, inclusive) of a rollout of ``steps``: the state, the memory, the snapshots."""
    step = operator.step if isinstance(operator, CompiledStep) else partial(noisy_step, operator)
    snapshots = []
    for t in range(first, last + 1):
        # Drawn before the step: the generator feeds nothing else, so the stream is that of apply_noise after it.
        draws = draw_noise(psi, generator) if rates is not None else None
        psi, memory = step(psi, memory, gamma, rates, draws)
        if t % every == 0 or t == steps:
            # A copy: under reduce-overhead with the step compiled, psi lives in the CUDA graphs' memory, which the
            # next episode's replays overwrite (reading it then is an error), while the history outlives the episode.
            snapshots.append(psi.detach().clone())
    return psi, memory, snapshots


def _checkpointed(
    evolve: Callable[..., Any],
    psi: torch.Tensor,
    memory: Any,
    generator: torch.Generator | None,
    weights: list[torch.Tensor],
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    """``evolve`` under activation checkpointing: run without a graph now, run again with one in the backward pass.

    The noise is replayed exactly: the generator is never drawn from inside the segment. A private copy is rewound
    to the segment's start on every run, and the caller's generator (the device's default one when it is None) is
    moved on to where the first run left the copy, as if it had drawn the noise itself. ``weights`` are the
    operator's parameters that take gradients: the segment's gradients reach them through the returned outputs.
    """
    if generator is None:
        generator = _default_generator(psi.device)
    start = generator.get_state()
    replay = torch.Generator(device=generator.device)
    memory_tensors, memory_in = _flatten_memory(memory)
    memory_out: list[Any] = []  # how the segment's memory comes back (none before the first step of a rollout)
    snapshots: list[torch.Tensor] = []

    def run(psi: torch.Tensor, *memory_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        replay.set_state(start)
        psi, memory, taken = evolve(psi, _unflatten_memory(memory_tensors, memory_in), replay)
        tensors, structure = _flatten_memory(memory)
        if not memory_out:  # the first run's (the recompute gives the same)
            memory_out.append(structure)
            snapshots.extend(taken)
        return (psi, *tensors)

    outputs = _Segment.apply(run, 1 + len(memory_tensors), psi, *memory_tensors, *weights)
    generator.set_state(replay.get_state())
    return outputs[0], _unflatten_memory(outputs[1:], memory_out[0]), list(snapshots)


def _flatten_memory(memory: Any) -> tuple[list[torch.Tensor], Any]:
    """A recurrent operator's memory (None, a tensor or a tuple, list or dict of them) as its tensors and its shape."""
    if memory is None:
        return [], None
    tensors, structure = tree_flatten(memory)
    if not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise TypeError(
            f"model.checkpoint_every needs an operator memory made of tensors, not {type(memory).__name__} holding "
            f"{sorted({type(leaf).__name__ for leaf in tensors})}"
        )
    return tensors, structure


def _unflatten_memory(tensors: Any, structure: Any) -> Any:
    return None if structure is None else tree_unflatten(list(tensors), structure)


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator that ``torch.rand(..., generator=None)`` draws from on ``device``."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _Segment(torch.autograd.Function):
    """Activation checkpointing of one rollout segment, without a hook per saved tensor.

    ``torch.utils.checkpoint`` (non-reentrant) runs two Python hooks for every tensor the autograd graph saves,
    about 100 per U-Net step. A rollout at one universe per episode is bound by such host-side work: on the CPU
    (the standard U-Net's depth at grid 8, hidden 4, 100 steps, bf16, ``checkpoint_every`` 10) it cost 2.17x the
    plain rollout's time, this 1.29x (``benchmarks/RESULTS.md``). The reentrant variant has no such hooks and is
    as fast, but it calls ``backward`` inside the backward pass, so each segment adds into the weights' ``.grad`` on
    its own: under DDP the reducer then all-reduces a part of the gradient, and two ranks' weights drifted apart
    without an error (``tests/test_ddp.py``). Here the forward runs without a graph; the backward runs the segment
    again with one, under the forward's autocast state, and returns the gradients of its inputs, weights included,
    through the outer graph. So each weight's gradient is summed by autograd and accumulated once, as in the plain
    rollout.

    ``apply(run, state_count, *state, *weights)``: ``run(*state)`` returns the state after the segment (tensors).
    """

    @staticmethod
    def forward(
        ctx: Any, run: Callable[..., tuple[torch.Tensor, ...]], state_count: int, *tensors: torch.Tensor
    ) -> Any:
        ctx.run = run
        ctx.state_count = state_count
        ctx.autocast = _autocast_state()
        ctx.set_materialize_grads(False)  # an output that the loss does not use (the last memory) gets no work
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return run(*tensors[:state_count])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        tensors = ctx.saved_tensors
        state = [tensor.detach().requires_grad_(tensor.requires_grad) for tensor in tensors[: ctx.state_count]]
        inputs = [*state, *tensors[ctx.state_count :]]
        with contextlib.ExitStack() as stack:
            for device, dtype, cache in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))
            with torch.enable_grad():
                outputs = ctx.run(*state)
        used = [(output, grad) for output, grad in zip(outputs, grads, strict=True) if grad is not None]
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        if not used or not wanted:
            return (None, None, *(None for _ in inputs))
        found = iter(
            torch.autograd.grad([output for output, _ in used], wanted, [grad for _, grad in used], allow_unused=True)
        )
        return (None, None, *(next(found) if tensor.requires_grad else None for tensor in inputs))


def _autocast_state(devices: tuple[str, ...] = ("cpu", "cuda")) -> list[tuple[str, torch.dtype, bool]]:
    """The autocast contexts in force on ``devices``: device type, dtype and weight cache (to enter them again)."""
    cache = torch.is_autocast_cache_enabled()
    try:
        return [
            (device, torch.get_autocast_dtype(device), cache) for device in devices if torch.is_autocast_enabled(device)
        ]
    except (AttributeError, TypeError):  # torch < 2.4 asks no device type
        old = {"cpu": (torch.is_autocast_cpu_enabled, torch.get_autocast_cpu_dtype),
               "cuda": (torch.is_autocast_enabled, torch.get_autocast_gpu_dtype)}  # fmt: skip
        return [(device, old[device][1](), cache) for device in devices if device in old and old[device][0]()]


#: Exceptions that pass through a compiled call instead of making it fall back to the plain computation: out of
#: memory (too big whichever path runs: the user must hear it).
_NOT_FAILURES: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


class _Compiled:
    """What both compile scopes share: ``torch.compile`` of ``target``, and the fallback to the plain computation
    (one warning) when compiling or capturing fails, on a call or at the probe."""

    def __init__(self, operator: nn.Module, mode: str, target: Callable[..., Any]) -> None:
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(COMPILE_MODES[1:])}")
        self.operator = operator
        self.mode = mode
        self.compiled: Callable[..., Any] | None = torch.compile(target, mode=mode)
        self._probed = False

    @property
    def active(self) -> bool:
        """False once compiling has failed and the plain computation runs instead."""
        return self.compiled is not None

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
    Its parameters stay those of ``operator`` (nothing is copied), so the optimizer and the checkpoints see the
    plain module. :meth:`probe` (which :func:`rollout` runs) compiles the forward and the backward once, so that a
    failure to compile or capture shows there, not inside ``loss.backward()``.

    Args:
        operator: The Law M operator.
        mode: ``default`` or ``reduce-overhead`` (see :data:`COMPILE_MODES`).
    """

    def __init__(self, operator: nn.Module, mode: str) -> None:
        super().__init__(operator, mode, operator)
        self.multiplicative = getattr(operator, "multiplicative", False)
        self.recurrent = getattr(operator, "recurrent", False)

    def __call__(self, x: torch.Tensor, *memory: Any) -> Any:
        return self._run(self.operator, _with_input_gradient(x), *memory)

    def probe(self, x: torch.Tensor) -> None:
        """Once, with gradients on: a forward and backward on ``x`` (the first step's input), to compile both."""

        def forward_and_backward(compiled: Callable[..., Any]) -> None:
            probe = x.detach().requires_grad_()
            out = compiled(probe, None)[0] if self.recurrent else compiled(probe)
            # autograd.grad, not backward: the probe must leave no gradient in the parameters.
            torch.autograd.grad(out.float().sum(), [probe, *_trainable_weights(self.operator)], allow_unused=True)

        self._probe(forward_and_backward)


class CompiledStep(_Compiled):
    """The whole step (operator, Euler update, normalisation, noise) behind ``torch.compile``.

    The plain step launches its own operations one by one from Python: 36 in the forward (4 of them the noise
    draws, which stay outside) and 54 in the backward, counted with a dispatch mode, views included. A rollout at one
    universe per episode is bound by such launches. What is compiled is :func:`noisy_step_pairs`, the step in real
    arithmetic on ``torch.view_as_real(psi)`` (a view: nothing is copied), which inductor fuses into a few kernels
    (the forward into 2 beside the operator's, on the CPU); with ``reduce-overhead`` each step is one CUDA graph.
    The noise comes in as drawn tensors and the noise rates as device scalars, so the graph is the same for every
    step, level and episode. Falls back to the plain step, with one warning, if compiling fails.

    Args:
        operator: The Law M operator.
        mode: ``default`` or ``reduce-overhead`` (see :data:`COMPILE_MODES`).
    """

    def __init__(self, operator: nn.Module, mode: str) -> None:
        super().__init__(operator, mode, noisy_step_pairs)

    def step(
        self, psi: torch.Tensor, memory: Any, gamma: float, rates: NoiseRates | None, draws: NoiseDraws | None
    ) -> tuple[torch.Tensor, Any]:
        """:func:`noisy_step` of the operator, compiled (as :func:`noisy_step_pairs`)."""
        pairs = torch.view_as_real(_with_input_gradient(psi))
        pairs, memory = self._run(noisy_step_pairs, self.operator, pairs, memory, gamma, rates, draws)
        return torch.view_as_complex(pairs), memory

    def probe(self, psi0: torch.Tensor, gamma: float, rates: NoiseRates | None) -> None:
        """Once, with gradients on: a forward and backward of one step from ``psi0``, to compile both."""

        def forward_and_backward(compiled: Callable[..., Any]) -> None:
            psi = psi0.detach().requires_grad_()
            draws = None
            if rates is not None:  # zeros: the shapes and devices of real draws, without drawing from the generator
                cells = torch.zeros(psi0.shape[:3], device=psi0.device)
                draws = NoiseDraws(cells, torch.zeros(psi0.shape, device=psi0.device), cells[0, 0, 0], cells)
            out, _ = compiled(self.operator, torch.view_as_real(psi), None, gamma, rates, draws)
            torch.autograd.grad(out.pow(2).sum(), [psi, *_trainable_weights(self.operator)], allow_unused=True)

        self._probe(forward_and_backward)


def fast_operator(
    operator: nn.Module, mode: str, device: torch.device | str, checkpoint_every: int = 0, scope: str = "operator"
) -> nn.Module | CompiledOperator | CompiledStep:
    """The operator as ``model.compile = mode`` asks, or the plain one (with one warning) where that cannot work.

    ``scope`` (``model.compile_scope``) says what is compiled: the operator alone, or the whole step
    (:class:`CompiledStep`). CUDA graphs need a CUDA device; they are not attempted for a recurrent operator (its
    memory changes from none to tensors after the first step and crosses from graph to graph) nor under activation
    checkpointing (the backward recomputes forwards in the middle of a replay).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"model.compile_scope={scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    if mode == "off":
        return operator
    if mode in CAPTURE_MODES:
        reason = None
        if torch.device(device).type != "cuda":
            reason = f"CUDA graphs need a CUDA device, not {torch.device(device).type}"
        elif getattr(operator, "recurrent", False):
            reason = f"{type(operator).__name__} carries a memory from step to step"
        elif checkpoint_every > 0:
            reason = "model.checkpoint_every recomputes the rollout inside the backward pass"
        if reason is not None:
            warnings.warn(
                f"model.compile={mode!r} is not possible here ({reason}); running the plain operator", stacklevel=2
            )
            return operator
    return CompiledStep(operator, mode) if scope == "step" else CompiledOperator(operator, mode)
