"""The loss registry (evolutionary, mse_energy, structure) and the checkpoint quality metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-6


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the defaults are the original's 10 / 5 / 1 and a 0.8 energy retention target."""

    survival: float = 10.0
    symmetry: float = 5.0
    complexity: float = 1.0
    target_retention: float = 0.8


def energy(psi: torch.Tensor) -> torch.Tensor:
    """Total energy ``sum |psi|^2`` of each universe: ``(B, H, W, d) -> (B,)``."""
    return psi.abs().pow(2).sum(dim=(1, 2, 3))


def survival(final: torch.Tensor, initial: torch.Tensor, target_retention: float = 0.8) -> torch.Tensor:
    """``|E_final - 0.8 E_init| / (E_init + 1e-6)``, averaged over universes.

    Note: the per-cell renormalisation of every step pins E_final to the number of cells, so with the default
    ``random`` start this term sits at ``1 - target_retention``; it is kept because the original scores it.
    """
    e_final, e_init = energy(final), energy(initial)
    return ((e_final - target_retention * e_init).abs() / (e_init + EPS)).mean()


def symmetry(final: torch.Tensor) -> torch.Tensor:
    """``mean((|psi| - |rot90(psi)|)^2)`` over the grid: 0 for a state invariant under a quarter turn."""
    magnitude = final.abs()  # (B, H, W, d)
    return (magnitude - torch.rot90(magnitude, 1, dims=(1, 2))).pow(2).mean()


def complexity(final: torch.Tensor) -> torch.Tensor:
    """``-log(std(sum_d |psi|) + 1e-6)`` per universe, averaged: rewards a density with spatial contrast."""
    density = final.abs().sum(-1).flatten(1)  # (B, H*W)
    return -torch.log(density.std(dim=1) + EPS).mean()


def edge_strength(final: torch.Tensor) -> torch.Tensor:
    """``-log(mean |grad density| + 1e-6)``: low when the density has sharp spatial structure."""
    density = final.abs().sum(-1)  # (B, H, W)
    dx = (density - torch.roll(density, 1, dims=2)).abs().mean()
    dy = (density - torch.roll(density, 1, dims=1)).abs().mean()
    return -torch.log(dx + dy + EPS)


def _evolutionary(final: torch.Tensor, initial: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    parts = _common_parts(final, initial, w)
    parts["loss"] = w.survival * parts["survival"] + w.symmetry * parts["symmetry"] + w.complexity * parts["complexity"]
    return parts


def _mse_energy(final: torch.Tensor, initial: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """Keep the energy where it was: ``mean((|psi_f|^2 - |psi_0|^2)^2)`` per amplitude, plus symmetry."""
    parts = _common_parts(final, initial, w)
    parts["energy_mse"] = (final.abs().pow(2) - initial.abs().pow(2)).pow(2).mean()
    parts["loss"] = w.survival * parts["energy_mse"] + w.symmetry * parts["symmetry"]
    return parts


def _structure(final: torch.Tensor, initial: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """Pattern formation only: symmetry, complexity and sharp edges, no energy term."""
    parts = _common_parts(final, initial, w)
    parts["edges"] = edge_strength(final)
    parts["loss"] = w.symmetry * parts["symmetry"] + w.complexity * (parts["complexity"] + parts["edges"])
    return parts


def _common_parts(final: torch.Tensor, initial: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """The three scores every loss reports, so logs and the checkpoint metric read the same for all of them."""
    return {
        "survival": survival(final, initial, w.target_retention),
        "symmetry": symmetry(final),
        "complexity": complexity(final),
    }


LossFn = Callable[[torch.Tensor, torch.Tensor, LossWeights], "dict[str, torch.Tensor]"]

#: Accepted values of ``model.loss``.
LOSSES: dict[str, LossFn] = {"evolutionary": _evolutionary, "mse_energy": _mse_energy, "structure": _structure}


def compute_loss(
    name: str, final: torch.Tensor, initial: torch.Tensor, weights: LossWeights | None = None
) -> dict[str, torch.Tensor]:
    """Score a rollout with the loss ``name``: a dict with ``loss`` and its parts."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not one of {', '.join(LOSSES)}")
    return LOSSES[name](final, initial, weights or LossWeights())


def combined_metric(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The checkpoint quality metric ``10 * survival + 5 * symmetry`` (lower is better), fixed across losses."""
    return 10.0 * parts["survival"] + 5.0 * parts["symmetry"]
