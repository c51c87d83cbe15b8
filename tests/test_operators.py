"""The Law M operators and QCAModule: shapes, near-zero start, registry, training on the CPU, determinism, settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.models import OPERATORS, operator_class
from atheria_lightning.module import QCAModule

D_STATE, HIDDEN, GRID = 2, 8, 8


class EpisodeLosses(Callback):
    """Collects the loss of every training episode, as the step returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: QCAModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(tmp_path: Path, model: QCAModule, episodes: int = 3, seed: int = 42) -> tuple[Trainer, list[float]]:
    """Train ``model`` for ``episodes`` episodes on the CPU, validating once at the end; returns the episode losses."""
    recorder = EpisodeLosses()
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        val_check_interval=episodes,
        check_val_every_n_epoch=None,
        callbacks=[recorder],
    )
    trainer.fit(model, EpisodeDataModule(total_episodes=episodes, seed=seed, val_every_episodes=episodes))
    return trainer, recorder.losses


def call(operator: torch.nn.Module, x: torch.Tensor, memory: Any = None) -> tuple[torch.Tensor, Any]:
    """The operator's output (and its memory, for a recurrent one), whatever its kind."""
    if operator.recurrent:
        return operator(x, memory)
    return operator(x), None


@pytest.mark.parametrize("name", list(OPERATORS))
def test_output_has_the_input_shape(name: str) -> None:
    torch.manual_seed(0)
    operator = operator_class(name)(D_STATE, HIDDEN)
    x = torch.randn(3, 2 * D_STATE, GRID, 2 * GRID)  # (B, 2d, H, W), not square on purpose
    out, _ = call(operator, x)
    assert out.shape == x.shape


@pytest.mark.parametrize("name", list(OPERATORS))
def test_output_starts_near_zero(name: str) -> None:
    torch.manual_seed(0)
    out, _ = call(operator_class(name)(D_STATE, HIDDEN), torch.ones(1, 2 * D_STATE, GRID, GRID))
    assert 0.0 < out.abs().max().item() < 1e-3


def test_convlstm_memory_carries_from_call_to_call() -> None:
    torch.manual_seed(0)
    operator = operator_class("UNET_CONVLSTM")(D_STATE, HIDDEN)
    x = torch.randn(2, 2 * D_STATE, GRID, GRID)
    first, memory = operator(x)
    fresh, _ = operator(x)
    remembered, next_memory = operator(x, memory)

    hidden, cell = memory
    assert hidden.shape == cell.shape == (2, 8 * HIDDEN, GRID // 4, GRID // 4)
    assert torch.equal(first, fresh), "without memory the operator is a pure function of its input"
    assert not torch.equal(remembered, fresh)
    assert not torch.equal(next_memory[1], cell)


def test_registry_rejects_unknown_names_listing_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="TRANSFORMER") as raised:
        operator_class("TRANSFORMER")
    for name in OPERATORS:
        assert name in str(raised.value)


def test_deep_qca_neighbour_sum_stays_frozen() -> None:
    torch.manual_seed(0)
    operator = operator_class("DEEP_QCA")(D_STATE, HIDDEN)
    kernel = operator.perceive.weight.detach().clone()
    assert not operator.perceive.weight.requires_grad
    assert kernel[:, :, 1, 1].eq(0).all() and kernel.sum().item() == 8 * kernel.shape[0]

    # Every parameter handed to the optimizer, weight decay included: the frozen kernel must still not move.
    optimizer = torch.optim.AdamW(operator.parameters(), lr=0.1, weight_decay=0.1)
    output_weight = operator.mlp[-1].weight.detach().clone()
    operator(torch.randn(1, 2 * D_STATE, GRID, GRID)).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(operator.perceive.weight, kernel)
    assert not torch.equal(operator.mlp[-1].weight, output_weight), "the trainable layers did take the step"


@pytest.mark.parametrize("name", list(OPERATORS))
def test_every_operator_trains_three_episodes(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = QCAModule(architecture=name, d_state=D_STATE, hidden_channels=HIDDEN, grid_size=GRID, qca_steps=3)
    before = {key: value.clone() for key, value in model.operator.state_dict().items()}
    trainer, losses = fit(tmp_path, model)

    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/combined"].item())
    trainable = {name for name, p in model.operator.named_parameters() if p.requires_grad}
    changed = {key for key, value in model.operator.state_dict().items() if not torch.equal(value, before[key])}
    assert changed == trainable


def noisy_model() -> QCAModule:
    torch.manual_seed(0)  # the same initial weights for every run
    # Full noise from the first episode, so the noise draws are part of what must replay.
    return QCAModule(
        architecture="MLP", d_state=D_STATE, hidden_channels=HIDDEN, grid_size=GRID, qca_steps=3, noise_ramp_episodes=0
    )


def test_same_data_seed_replays_the_same_losses(tmp_path: Path) -> None:
    _, first = fit(tmp_path, noisy_model(), episodes=4, seed=7)
    _, again = fit(tmp_path, noisy_model(), episodes=4, seed=7)
    _, other = fit(tmp_path, noisy_model(), episodes=4, seed=8)

    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    ("setting", "flag"),
    [
        ({"architecture": "TRANSFORMER"}, "model.architecture"),
        ({"loss": "entropy"}, "model.loss"),
        ({"initial_state": "vacuum"}, "model.initial_state"),
        ({"architecture": "UNET", "grid_size": 30}, "model.grid_size=30"),
        ({"architecture": "MLP", "grid_size": 4}, "model.grid_size=4"),
        ({"d_state": 0}, "model.d_state"),
        ({"hidden_channels": -1}, "model.hidden_channels"),
        ({"qca_steps": 0}, "model.qca_steps"),
        ({"universes_per_episode": 0}, "model.universes_per_episode"),
        ({"gamma_decay": 1.0}, "model.gamma_decay"),
        ({"max_noise": -0.1}, "model.max_noise"),
        ({"noise_ramp_episodes": -1}, "model.noise_ramp_episodes"),
        ({"lr": 0.0}, "model.lr"),
        ({"lr_factor": 1.0}, "model.lr_factor"),
    ],
)
def test_bad_model_settings_name_their_flag(setting: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        QCAModule(**{"architecture": "MLP", "grid_size": GRID, **setting})


def test_unet_grid_error_says_divisible_by_four() -> None:
    with pytest.raises(ConfigError, match="divisible by 4 for UNET"):
        QCAModule(architecture="UNET", grid_size=30)


@pytest.mark.parametrize("setting", ["total_episodes", "val_every_episodes", "val_universes"])
def test_bad_data_settings_name_their_flag(setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.{setting}=0"):
        EpisodeDataModule(**{setting: 0})
