"""Speed machinery for the rollout, kept out of the physics: compiled, captured and checkpointed steps."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from atheria_lightning.accel.checkpoint import Runner
from atheria_lightning.accel.compile import (
    CAPTURE_MODES,
    COMPILE_MODES,
    COMPILE_SCOPES,
    CompiledOperator,
    CompiledStep,
)
from atheria_lightning.accel.precision import weight_cast_cache
from atheria_lightning.physics.engine import Stepper

__all__ = [
    "CAPTURE_MODES",
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "CompiledOperator",
    "CompiledStep",
    "Runner",
    "fast_stepper",
    "weight_cast_cache",
]


def fast_stepper(
    operator: nn.Module, mode: str, device: torch.device | str, checkpoint_every: int = 0, scope: str = "operator"
) -> Stepper:
    """What :func:`~atheria_lightning.physics.engine.rollout` should step with, as ``model.compile = mode``,
    ``model.compile_scope = scope`` and ``model.checkpoint_every`` ask: the plain steps
    (:class:`~atheria_lightning.physics.engine.Stepper`) when none of them applies, else a :class:`Runner` (compiled
    when ``mode`` is not ``off``).

    ``scope`` says what is compiled: the operator alone (:class:`CompiledOperator`) or the whole step
    (:class:`CompiledStep`). CUDA graphs need a CUDA device; they are not attempted for a recurrent operator (its
    memory changes from none to tensors after the first step and crosses from graph to graph) nor under activation
    checkpointing (the backward recomputes forwards in the middle of a replay): there the plain operator runs, after
    one warning.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"model.compile_scope={scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    if mode in CAPTURE_MODES:
        reason = _why_not_capture(operator, torch.device(device), checkpoint_every)
        if reason is not None:
            warnings.warn(
                f"model.compile={mode!r} is not possible here ({reason}); running the plain operator", stacklevel=2
            )
            mode = "off"
    if mode != "off":
        return (CompiledStep if scope == "step" else CompiledOperator)(operator, mode, checkpoint_every)
    return Runner(operator, checkpoint_every) if checkpoint_every > 0 else Stepper(operator)


def _why_not_capture(operator: nn.Module, device: torch.device, checkpoint_every: int) -> str | None:
    """Why CUDA graphs cannot replay this rollout, or None when they can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if getattr(operator, "recurrent", False):
        return f"{type(operator).__name__} carries a memory from step to step"
    if checkpoint_every > 0:
        return "model.checkpoint_every recomputes the rollout inside the backward pass"
    return None
