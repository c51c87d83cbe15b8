"""The simulated universe in plain torch: states, the Lindblad-Euler step, noise and losses (no Lightning here)."""

from atheria_lightning.physics.engine import (
    RolloutResult,
    Step,
    Stepper,
    episode_generator,
    evolve,
    lindblad_step,
    noisy_step,
    rollout,
)
from atheria_lightning.physics.losses import LOSSES, LossWeights, combined_metric, compute_loss
from atheria_lightning.physics.noise import noise_level
from atheria_lightning.physics.state import INITIAL_STATES, cell_norm, initial_state, normalize, psi_magnitude

__all__ = [
    "INITIAL_STATES",
    "LOSSES",
    "LossWeights",
    "RolloutResult",
    "Step",
    "Stepper",
    "cell_norm",
    "combined_metric",
    "compute_loss",
    "episode_generator",
    "evolve",
    "initial_state",
    "lindblad_step",
    "noise_level",
    "noisy_step",
    "normalize",
    "psi_magnitude",
    "rollout",
]
