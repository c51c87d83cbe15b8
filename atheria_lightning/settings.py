"""The model's settings in small groups, each checked on its own; and which settings may change between sessions.

Each setting is declared once, as a field of its group: its name, type, default, check and help. ``QCAModule``
takes them flat, by keyword (``--model.lr``, ``--model.grid_size``: the CLI keys users type), through
:func:`flat_settings`, whose signature and ``Args:`` are built from the fields; LightningCLI reads them there.
"""

from __future__ import annotations

import inspect
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

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
    "flat_settings",
    "refuse_fixed_changes",
]

# U-Nets pool twice; below 8 cells their bottleneck is 1x1 and the symmetry score is meaningless.
MIN_GRID_SIZE = 8


def setting(default: Any, doc: str) -> Any:
    """A field of a settings group: its default, and its help (``atheria fit --help``, ``flat_settings``' Args)."""
    return field(default=default, metadata={"doc": doc})


def _positive(group: object, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        require(value > 0, f"model.{name}={value} must be a positive integer")


@dataclass(frozen=True)
class OperatorSettings:
    """What shapes the operator's weights: a run cannot resume under other values."""

    architecture: str = setting(
        "UNET", "The operator, one of ``UNET``, ``UNET_UNITARY``, ``MLP``, ``DEEP_QCA``, ``UNET_CONVLSTM``."
    )
    d_state: int = setting(8, "Complex amplitudes per cell.")
    hidden_channels: int = setting(64, "Width of the operator (h); the U-Net goes up to 8h at its bottleneck.")

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

    grid_size: int = setting(64, "Side of the square universe; divisible by 4 for the U-Nets, at least 8.")
    qca_steps: int = setting(100, "Lindblad-Euler steps per episode; the gradient flows back through all of them.")
    gamma_decay: float = setting(0.01, "Damping ``gamma`` of ``psi' = psi + A(psi) - gamma * psi``, in [0, 1).")
    universes_per_episode: int = setting(
        1,
        "Universes rolled out together in one episode (the batch); 1 as the original. On a GPU the time of an episode"
        " hardly grows with it up to tens of universes: it is the speed lever.",
    )
    initial_state: str = setting("random", "``random`` (the original), ``complex_noise`` or ``zeros``.")
    max_nonfinite_episodes: int = setting(
        20, "Consecutive non-finite episodes after which training stops with an error."
    )
    history_states: int = setting(
        10, "Unused (the rollout keeps no history); accepted so that older presets and checkpoints load."
    )

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

    max_noise: float = setting(0.05, "Final environment noise level of the curriculum, in [0, 1).")
    noise_ramp_episodes: int = setting(2000, "Episodes over which the noise ramps linearly from 0 to ``max_noise``.")

    def __post_init__(self) -> None:
        require(0.0 <= self.max_noise < 1.0, f"model.max_noise={self.max_noise} must be in [0, 1)")
        require(self.noise_ramp_episodes >= 0, f"model.noise_ramp_episodes={self.noise_ramp_episodes} must be >= 0")


@dataclass(frozen=True)
class LossSettings:
    """The loss from the losses registry and the weights of its terms."""

    loss: str = setting("evolutionary", "``evolutionary`` (the original), ``mse_energy`` or ``structure``.")
    survival_weight: float = setting(10.0, "Weight of the survival (or energy) term.")
    symmetry_weight: float = setting(5.0, "Weight of the rot90 symmetry term.")
    complexity_weight: float = setting(1.0, "Weight of the complexity term.")
    target_retention: float = setting(0.8, "Share of the initial energy the final state should keep.")

    def __post_init__(self) -> None:
        require(self.loss in LOSSES, f"model.loss={self.loss!r} is not one of {', '.join(LOSSES)}")

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.survival_weight, self.symmetry_weight, self.complexity_weight, self.target_retention)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and the plateau scheduler on ``train/loss``."""

    lr: float = setting(1e-4, "AdamW learning rate.")
    weight_decay: float = setting(1e-5, "AdamW weight decay.")
    lr_patience: int = setting(
        100, "Episodes without improvement of ``train/loss`` before the learning rate is halved."
    )
    lr_factor: float = setting(0.5, "Factor applied to the learning rate on a plateau.")

    def __post_init__(self) -> None:
        require(self.lr > 0.0, f"model.lr={self.lr} must be > 0")
        require(0.0 < self.lr_factor < 1.0, f"model.lr_factor={self.lr_factor} must be in (0, 1)")


@dataclass(frozen=True)
class SpeedSettings:
    """How the rollout runs (``atheria_lightning.accel``): the same numbers, another speed or memory."""

    checkpoint_every: int = setting(
        0,
        "Activation checkpointing, 0 = off: keep only the state every this many steps and recompute the steps in "
        "between during the backward pass (one more forward pass, without a graph; the same numbers at fp32, rounded "
        "slightly differently under mixed precision). The memory left is one state per segment plus one segment's "
        "activations; a state is about a hundred times smaller than one step's U-Net activations, so 1 or 2 uses the "
        "least (``benchmarks/RESULTS.md``, the grid-128 memory).",
    )
    compile: str = setting(
        "off",
        "``off``; ``default`` (``torch.compile`` of the operator); ``reduce-overhead`` (the same, replayed as CUDA "
        "graphs), which needs a GPU and a non-recurrent operator without ``checkpoint_every``; elsewhere, or if "
        "compiling fails, the plain operator runs after one warning. The maths is that of ``off``.",
    )
    compile_scope: str = setting(
        "operator",
        "What ``compile`` compiles: ``operator`` (the operator alone; the one measured on a GPU so far) or ``step`` "
        "(the whole step in real arithmetic: operator, Euler update, normalisation and noise fused, and with "
        "``reduce-overhead`` one CUDA graph per step; the same numbers; faster than ``operator`` on the CPU, not yet "
        'measured on a GPU: ``benchmarks/RESULTS.md``, "The compiled step in real arithmetic").',
    )
    channels_last: bool = setting(
        True,
        "On a GPU, store the operator's weights channels-last so cuDNN runs its NHWC kernels (the state already "
        "reaches the operator in that layout). Ignored on the CPU.",
    )

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
        """The groups from the flat ``model.*`` keys (:func:`flat_settings`' names).

        The operator is built first: a wrong architecture is the error to name, not the grid it would need.
        """
        return cls(**{name: kind(**{key: settings[key] for key in _names(kind) if key in settings})
                      for name, kind in _GROUPS.items()})  # fmt: skip


_GROUPS: dict[str, type] = {
    "operator": OperatorSettings,
    "rollout": RolloutSettings,
    "noise": NoiseSettings,
    "loss": LossSettings,
    "optimizer": OptimizerSettings,
    "speed": SpeedSettings,
}


def _names(group: type) -> list[str]:
    return [item.name for item in fields(group)]


def _flat_signature() -> inspect.Signature:
    """Every field of every group as a keyword parameter, with its type and default."""
    return inspect.Signature([
        inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=hints[item.name])
        for group in _GROUPS.values() for hints in [get_type_hints(group)] for item in fields(group)
    ])  # fmt: skip


def flat_settings(**settings: Any) -> dict[str, Any]:
    """Every ``model.*`` setting by name, the defaults filled in; a :class:`TypeError` names an unknown one."""
    bound = _FLAT_SIGNATURE.bind(**settings)
    bound.apply_defaults()
    return dict(bound.arguments)


# The signature and Args that LightningCLI (jsonargparse) reads: QCAModule passes its **settings on to here.
_FLAT_SIGNATURE = flat_settings.__signature__ = _flat_signature()
flat_settings.__doc__ = f"{flat_settings.__doc__}\n\nArgs:\n" + "".join(
    f"    {item.name}: {item.metadata['doc']}\n" for group in _GROUPS.values() for item in fields(group)
)


# ----- sessions -----
#: What a resumed run must keep: the operator's shape (its weights) and the data seed (its episodes). Every other
#: setting may change between sessions, takes effect on resume, and is reported at the start.
FIXED_ON_RESUME = (
    *(f"model.{name}" for name in _names(OperatorSettings)),
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
