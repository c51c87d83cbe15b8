"""The model's settings in small groups, each checked on its own; and which settings may change between sessions.

``QCAModule`` keeps its flat arguments (``--model.lr``, ``--model.grid_size``: the CLI keys users type) and groups
them here, so that each group validates itself by name and no long positional list can swap two values.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, fields
from typing import Any

from atheria_lightning.accel import COMPILE_MODES, COMPILE_SCOPES
from atheria_lightning.errors import ConfigError, require
from atheria_lightning.models import QCAOperator, operator_class
from atheria_lightning.physics import INITIAL_STATES, LOSSES, LossWeights

__all__ = [
    "FIXED_ON_RESUME",
    "LossSettings",
    "ModelSettings",
    "NoiseSettings",
    "OperatorSettings",
    "OptimizerSettings",
    "RolloutSettings",
    "SpeedSettings",
    "apply_changed_optimizer_settings",
    "changed_settings",
    "refuse_fixed_changes",
]

# U-Nets pool twice; below 8 cells their bottleneck is 1x1 and the symmetry score is meaningless.
MIN_GRID_SIZE = 8


def _positive(group: object, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        require(value > 0, f"model.{name}={value} must be a positive integer")


@dataclass(frozen=True)
class OperatorSettings:
    """What shapes the operator's weights: a run cannot resume under other values."""

    architecture: str = "UNET"
    d_state: int = 8
    hidden_channels: int = 64

    def __post_init__(self) -> None:
        try:
            operator_class(self.architecture)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _positive(self, "d_state", "hidden_channels")

    @property
    def operator_class(self) -> type[QCAOperator]:
        return operator_class(self.architecture)


@dataclass(frozen=True)
class RolloutSettings:
    """One episode's universe: its size, the steps rolled out, the damping and how many universes run together."""

    grid_size: int = 64
    qca_steps: int = 100
    gamma_decay: float = 0.01
    universes_per_episode: int = 1
    initial_state: str = "random"
    max_nonfinite_episodes: int = 20
    history_states: int = 10  # unused: the rollout keeps no history; accepted so older presets and checkpoints load

    def __post_init__(self) -> None:
        require(
            self.initial_state in INITIAL_STATES,
            f"model.initial_state={self.initial_state!r} is not one of {', '.join(INITIAL_STATES)}",
        )
        _positive(self, "qca_steps", "universes_per_episode", "max_nonfinite_episodes")
        require(0.0 <= self.gamma_decay < 1.0, f"model.gamma_decay={self.gamma_decay} must be in [0, 1)")

    def check_grid(self, operator: OperatorSettings) -> None:
        """The grid must suit the operator: at least ``MIN_GRID_SIZE`` cells and a multiple of what it pools by."""
        multiple = operator.operator_class.grid_multiple
        require(
            self.grid_size >= MIN_GRID_SIZE and self.grid_size % multiple == 0,
            f"model.grid_size={self.grid_size} must be at least {MIN_GRID_SIZE}"
            + (f" and divisible by {multiple} for {operator.architecture}" if multiple > 1 else ""),
        )


@dataclass(frozen=True)
class NoiseSettings:
    """The environment noise curriculum: a linear ramp from 0 to ``max_noise`` over ``noise_ramp_episodes``."""

    max_noise: float = 0.05
    noise_ramp_episodes: int = 2000

    def __post_init__(self) -> None:
        require(0.0 <= self.max_noise < 1.0, f"model.max_noise={self.max_noise} must be in [0, 1)")
        require(self.noise_ramp_episodes >= 0, f"model.noise_ramp_episodes={self.noise_ramp_episodes} must be >= 0")


@dataclass(frozen=True)
class LossSettings:
    """The loss from the losses registry and the weights of its terms."""

    loss: str = "evolutionary"
    survival_weight: float = 10.0
    symmetry_weight: float = 5.0
    complexity_weight: float = 1.0
    target_retention: float = 0.8

    def __post_init__(self) -> None:
        require(self.loss in LOSSES, f"model.loss={self.loss!r} is not one of {', '.join(LOSSES)}")

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.survival_weight, self.symmetry_weight, self.complexity_weight, self.target_retention)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and the plateau scheduler on ``train/loss``."""

    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_patience: int = 100
    lr_factor: float = 0.5

    def __post_init__(self) -> None:
        require(self.lr > 0.0, f"model.lr={self.lr} must be > 0")
        require(0.0 < self.lr_factor < 1.0, f"model.lr_factor={self.lr_factor} must be in (0, 1)")


@dataclass(frozen=True)
class SpeedSettings:
    """How the rollout runs (``atheria_lightning.accel``): the same numbers, another speed or memory."""

    checkpoint_every: int = 0
    compile: str = "off"
    compile_scope: str = "operator"
    channels_last: bool = True

    def __post_init__(self) -> None:
        require(self.checkpoint_every >= 0, f"model.checkpoint_every={self.checkpoint_every} must be >= 0 (0 = off)")
        require(
            self.compile in COMPILE_MODES, f"model.compile={self.compile!r} is not one of {', '.join(COMPILE_MODES)}"
        )
        require(
            self.compile_scope in COMPILE_SCOPES,
            f"model.compile_scope={self.compile_scope!r} is not one of {', '.join(COMPILE_SCOPES)}",
        )


@dataclass(frozen=True)
class ModelSettings:
    """Every ``model.*`` setting, in its group."""

    operator: OperatorSettings
    rollout: RolloutSettings
    noise: NoiseSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    speed: SpeedSettings

    def __post_init__(self) -> None:
        self.rollout.check_grid(self.operator)

    @classmethod
    def from_flat(cls, settings: dict[str, Any]) -> ModelSettings:
        """The groups from the flat ``model.*`` keys (``QCAModule``'s arguments); every key belongs to one group.

        The operator is built first: a wrong architecture is the error to name, not the grid it would need.
        """
        keys = {name: {field.name for field in fields(kind)} for name, kind in _GROUPS.items()}
        unknown = set(settings) - set().union(*keys.values())
        require(not unknown, f"model settings {sorted(unknown)} belong to no group")
        return cls(**{name: kind(**{key: settings[key] for key in keys[name] if key in settings})
                      for name, kind in _GROUPS.items()})  # fmt: skip


_GROUPS: dict[str, type] = {
    "operator": OperatorSettings,
    "rollout": RolloutSettings,
    "noise": NoiseSettings,
    "loss": LossSettings,
    "optimizer": OptimizerSettings,
    "speed": SpeedSettings,
}


# ----- sessions -----
#: What a resumed run must keep: the operator's shape (its weights) and the data seed (its episodes). Every other
#: setting may change between sessions, takes effect on resume, and is reported at the start.
FIXED_ON_RESUME = (
    *(f"model.{field.name}" for field in fields(OperatorSettings)),
    "data.seed",
    "SmartCheckpoint.monitor",
)
#: Why each kind of fixed setting cannot change, by the key's first part.
_WHY_FIXED = {
    "model": "this run's weights have another shape",
    "data": "this run's episodes follow another seed",
    "SmartCheckpoint": "this run's best checkpoints are ranked by the checkpoint's metric",
}


def refuse_fixed_changes(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when a setting of :data:`FIXED_ON_RESUME` differs from the checkpoint's.

    ``saved`` and ``now`` map the keys as the CLI names them (``model.d_state``, ``data.seed``) to values.
    """
    for key in FIXED_ON_RESUME:
        if key in saved and key in now and saved[key] != now[key]:
            part = key.split(".")[0]
            hint = " (atheria curriculum's load_from_phase carries matching weights over)" if part == "model" else ""
            raise ConfigError(
                f"{key}={shown(now[key])} differs from the checkpoint's {shown(saved[key])}: {_WHY_FIXED[part]}; "
                f"keep the setting, or start a new experiment_name{hint}"
            )


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each setting outside :data:`FIXED_ON_RESUME` whose value differs from the checkpoint's."""
    return [f"{key} {shown(saved[key])} -> {shown(value)}" for key, value in now.items()
            if key in saved and key not in FIXED_ON_RESUME and saved[key] != value]  # fmt: skip


_SHOWN = reprlib.Repr()  # its limits as attributes: Python 3.11's takes no arguments
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxdict = 8
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)``, cut short: a checkpoint's settings may come from a file someone else wrote."""
    return _SHOWN.repr(value)


def apply_changed_optimizer_settings(checkpoint: dict[str, Any], optimizer: OptimizerSettings) -> None:
    """New optimizer settings take effect on resume: Lightning restores the optimizer and scheduler states as they
    were saved, so the new lr, weight decay and plateau settings are written into them first.

    Only settings that differ from the checkpoint's own hyper-parameters: an unchanged ``lr`` keeps whatever the
    plateau scheduler has lowered it to.
    """
    saved = checkpoint.get("hyper_parameters") or {}

    def changed(key: str) -> bool:
        return key in saved and saved[key] != getattr(optimizer, key)

    groups = [group for state in checkpoint.get("optimizer_states") or [] for group in state.get("param_groups", [])]
    for group in groups:
        if changed("lr"):
            group["lr"] = optimizer.lr
            if "initial_lr" in group:
                group["initial_lr"] = optimizer.lr
        if changed("weight_decay"):
            group["weight_decay"] = optimizer.weight_decay
    for scheduler in checkpoint.get("lr_schedulers") or []:
        if changed("lr") and "_last_lr" in scheduler:
            scheduler["_last_lr"] = [optimizer.lr] * len(scheduler["_last_lr"])
        if changed("lr_factor") and "factor" in scheduler:
            scheduler["factor"] = optimizer.lr_factor
        if changed("lr_patience") and "patience" in scheduler:
            scheduler["patience"] = optimizer.lr_patience
