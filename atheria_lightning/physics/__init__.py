"""The simulated universe in plain torch: states, the Lindblad-Euler step, noise and losses (no Lightning here)."""

from atheria_lightning.physics.engine import RolloutResult, episode_generator, lindblad_step, rollout
from atheria_lightning.physics.losses import LOSSES, LossWeights, combined_metric, compute_loss
from atheria_lightning.physics.noise import apply_noise, bit_flip, noise_level, phase_flip
from atheria_lightning.physics.state import INITIAL_STATES, cell_norm, initial_state, normalize

__all__ = [
    "INITIAL_STATES",
    "LOSSES",
    "LossWeights",
    "RolloutResult",
    "apply_noise",
    "bit_flip",
    "cell_norm",
    "combined_metric",
    "compute_loss",
    "episode_generator",
    "initial_state",
    "lindblad_step",
    "noise_level",
    "normalize",
    "phase_flip",
    "rollout",
]
