"""The plain runner of a rollout's steps, and its activation checkpointing: segments recomputed in the backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from atheria_lightning.accel.precision import autocast_state
from atheria_lightning.physics.engine import Stepper, evolve
from atheria_lightning.physics.noise import NoiseRates


class Runner(Stepper):
    """Runs a rollout's steps (a :class:`~atheria_lightning.physics.engine.Stepper`), in activation-checkpointed
    segments of ``checkpoint_every`` steps when gradients are on.

    With ``checkpoint_every = k > 0`` only the state at every k-th step is kept for the backward pass; each segment of
    k steps is recomputed during the backward, with the very same noise draws. The result and the gradients are those
    of the plain rollout, for one more forward pass (the first one builds no graph). The memory falls from ``steps``
    steps of activations to ``steps / k`` states plus k steps of activations. With ``k = 0`` (or k at least the
    rollout's length) the steps simply run one after the other.

    Subclasses (:mod:`atheria_lightning.accel.compile`) change how one step runs (:meth:`step`) and what happens before
    the first (:meth:`prepare`).

    Args:
        operator: The Law M operator; an ``nn.Module`` when ``checkpoint_every > 0``, so that its weights get the
            gradients of every segment.
        checkpoint_every: Steps per checkpointed segment; 0 keeps every step's activations.
    """

    def __init__(self, operator: nn.Module, checkpoint_every: int = 0) -> None:
        if checkpoint_every > 0 and not isinstance(operator, nn.Module):
            # A bare function closing over a module: its weights would silently get no gradient from a segment.
            raise TypeError(f"checkpoint_every needs the operator as an nn.Module, not {type(operator).__name__}")
        super().__init__(operator)
        self.checkpoint_every = checkpoint_every

    def prepare(self, psi0: torch.Tensor, gamma: float, rates: NoiseRates | None) -> None:
        """Called once per rollout before its first step, outside any checkpointed segment (whose recompute would not
        repeat it) and under the steps' autocast state. The plain runner has nothing to prepare."""

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
        """``steps`` steps on from ``psi`` and ``memory``, in checkpointed segments when asked and gradients are on."""
        self.prepare(psi, gamma, rates)
        segment = self.checkpoint_every if self.checkpoint_every > 0 and torch.is_grad_enabled() else steps
        if segment >= steps:
            return evolve(self.step, psi, memory, generator, steps=steps, gamma=gamma, rates=rates)
        weights = trainable_weights(self.operator)
        for done in range(0, steps, segment):
            run = partial(evolve, self.step, steps=min(segment, steps - done), gamma=gamma, rates=rates)
            psi, memory = checkpointed(run, psi, memory, generator, weights)
        return psi, memory


def trainable_weights(operator: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``operator`` that take gradients: the inputs through which a checkpointed segment's gradients
    reach them."""
    return [parameter for parameter in operator.parameters() if parameter.requires_grad]


def checkpointed(
    segment: Callable[[torch.Tensor, Any, torch.Generator], tuple[torch.Tensor, Any]],
    psi: torch.Tensor,
    memory: Any,
    generator: torch.Generator | None,
    weights: list[torch.Tensor],
) -> tuple[torch.Tensor, Any]:
    """``segment(psi, memory, generator)`` under activation checkpointing: run without a graph now, run again with one
    in the backward pass.

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

    def run(psi: torch.Tensor, *memory_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        replay.set_state(start)
        psi, memory = segment(psi, _unflatten_memory(memory_tensors, memory_in), replay)
        tensors, structure = _flatten_memory(memory)
        if not memory_out:  # the first run's (the recompute gives the same)
            memory_out.append(structure)
        return (psi, *tensors)

    outputs = _Segment.apply(run, 1 + len(memory_tensors), psi, *memory_tensors, *weights)
    generator.set_state(replay.get_state())
    return outputs[0], _unflatten_memory(outputs[1:], memory_out[0])


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
    about 100 per U-Net step, and a rollout at one universe per episode is bound by such host-side work ("Activation
    checkpointing without a hook per saved tensor" in ``benchmarks/RESULTS.md``). The reentrant variant has no such
    hooks, but it calls ``backward`` inside the backward pass, so each segment adds into the weights' ``.grad`` on
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
        ctx.autocast = autocast_state()
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
