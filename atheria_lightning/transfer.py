"""A phase that starts from an earlier one: that phase's best checkpoint, and the tensors whose name and shape match."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from atheria_lightning.store import RunStore

__all__ = ["SourceCheckpoint", "WeightTransfer", "best_checkpoint", "transfer_matching_weights", "transfer_report"]


@dataclass(frozen=True)
class SourceCheckpoint:
    """The verified checkpoint of an earlier phase that a new phase starts from."""

    phase: str
    path: str
    episode: int
    metric: float | None


@dataclass(frozen=True)
class WeightTransfer:
    """What :func:`transfer_matching_weights` did: the tensors copied, and one line per tensor left as initialised."""

    copied: list[str]
    skipped: list[str]
    model_tensors: int


def best_checkpoint(phase: str, run_dir: str) -> SourceCheckpoint | None:
    """The checkpoint of phase ``phase`` (run folder ``run_dir``) that its run store calls best."""
    chosen = RunStore(run_dir).best()
    if chosen is None:
        return None
    return SourceCheckpoint(phase=phase, path=chosen.path, episode=chosen.episode, metric=chosen.metric)


def transfer_matching_weights(model: torch.nn.Module, path: str) -> WeightTransfer:
    """Copy into ``model`` every tensor of checkpoint ``path`` whose name and shape match; describe the rest.

    The file is loaded with ``weights_only=True``: it may come from a mirror.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    target = model.state_dict()
    matching = {name: value for name, value in source.items() if name in target and target[name].shape == value.shape}
    model.load_state_dict(matching, strict=False)
    names = dict.fromkeys([*target, *source])  # this phase's order first, then what only the source has
    skipped = [_describe_skip(name, source.get(name), target.get(name)) for name in names if name not in matching]
    return WeightTransfer(copied=list(matching), skipped=skipped, model_tensors=len(target))


def _describe_skip(name: str, before: torch.Tensor | None, now: torch.Tensor | None) -> str:
    if before is None:
        return f"{name}: new in this phase, {tuple(now.shape)}"
    if now is None:
        return f"{name}: not in this phase's model, was {tuple(before.shape)}"
    return f"{name}: {tuple(before.shape)} -> {tuple(now.shape)}"


def transfer_report(phase: str, source: SourceCheckpoint, transfer: WeightTransfer) -> str:
    """What phase ``phase`` took from ``source``: one line, then one per tensor it left as initialised."""
    metric = "" if source.metric is None else f", monitored metric {source.metric:.4f}"
    head = (f"phase {phase}: initialised from phase {source.phase} {os.path.basename(source.path)} "
            f"(episode {source.episode}{metric}): copied {len(transfer.copied)} of {transfer.model_tensors} tensors "
            f"(name and shape match), skipped {len(transfer.skipped)}:")  # fmt: skip
    return "\n".join([head, *(f"  skipped {line}" for line in transfer.skipped)])
