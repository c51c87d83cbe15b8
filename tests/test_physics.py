"""The simulated universe: the Lindblad-Euler step, noise and its curriculum, losses, initial states, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from atheria_lightning.physics import (
    INITIAL_STATES,
    LOSSES,
    Stepper,
    cell_norm,
    combined_metric,
    compute_loss,
    episode_generator,
    initial_state,
    lindblad_step,
    noise_level,
    rollout,
)
from atheria_lightning.physics.losses import complexity, survival, symmetry
from atheria_lightning.physics.noise import apply_drawn_noise, draw_noise, noise_rates

D_STATE = 2


def random_state(grid_size: int = 8, universes: int = 2, seed: int = 0) -> torch.Tensor:
    return initial_state("random", universes, grid_size, D_STATE, torch.Generator().manual_seed(seed))


def changed_cells(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """A boolean ``(B, H, W)``: the cells where any amplitude changed."""
    return (after != before).any(dim=-1)


def assert_about(count: int, cells: int, rate: float) -> None:
    """``count`` is within 5 binomial standard deviations of ``rate * cells``."""
    sigma = math.sqrt(cells * rate * (1 - rate))
    assert abs(count - rate * cells) < 5 * sigma, f"{count} of {cells} cells, expected about {rate * cells:.0f}"


def phase_flip(psi: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The original's phase flip, drawn on the spot: each amplitude of about ``rate`` of the cells turned by a random
    phase ``exp(i*theta)``; |psi| is kept."""
    cells = torch.rand(psi.shape[:3], generator=generator, device=psi.device).unsqueeze(-1) < rate
    angle = torch.rand(psi.shape, generator=generator, device=psi.device) * (2 * math.pi)
    return torch.where(cells, psi * torch.polar(torch.ones_like(angle), angle), psi)


def bit_flip(
    psi: torch.Tensor, rate: float, generator: torch.Generator | None = None, gate: torch.Tensor | bool = True
) -> torch.Tensor:
    """The original's bit flip, drawn on the spot: the sign of about ``rate`` of the cells inverted, where ``gate``
    (a device boolean) is true."""
    cells = torch.rand(psi.shape[:3], generator=generator, device=psi.device).unsqueeze(-1) < rate
    return torch.where(cells & gate, -psi, psi)


def apply_noise(psi: torch.Tensor, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of the rollout's noise at ``level``, drawn ahead of it as the rollout draws it."""
    return apply_drawn_noise(psi, noise_rates(level, psi.device), draw_noise(psi, generator))


class ZeroOperator(nn.Module):
    """An operator whose delta is always zero, so only the damping acts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class NoHostSync(TorchFunctionMode):
    """Fails on the torch calls that make the host wait for the device: reading values back, or boolean indexing
    (whose result size is only known once the mask has been computed)."""

    SYNCING = {"item", "tolist", "numpy", "cpu", "nonzero", "argwhere", "masked_select", "unique"}
    SYNCING |= {"__bool__", "__int__", "__float__", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        if name in self.SYNCING or (isinstance(index, torch.Tensor) and index.dtype == torch.bool):
            raise AssertionError(f"host sync in the rollout: torch {name}")
        return func(*args, **(kwargs or {}))


# --- the Lindblad-Euler step ----------------------------------------------------------------------------------------


def test_lindblad_step_keeps_every_cell_at_unit_norm() -> None:
    torch.manual_seed(0)
    operator = nn.Conv2d(2 * D_STATE, 2 * D_STATE, 1)  # a random, far from small delta
    psi, _ = lindblad_step(operator, random_state(), gamma=0.3)
    torch.testing.assert_close(cell_norm(psi), torch.ones_like(cell_norm(psi)))


def test_damping_alone_is_undone_by_the_renormalisation() -> None:
    psi0 = random_state()
    psi, memory = lindblad_step(ZeroOperator(), psi0, gamma=0.2)
    torch.testing.assert_close(psi, psi0)
    assert memory is None


# --- noise ------------------------------------------------------------------------------------------------------------


def test_phase_flip_keeps_magnitudes_and_turns_about_rate_of_the_cells() -> None:
    psi0, rate = random_state(grid_size=128, universes=2), 0.1
    psi = phase_flip(psi0, rate, torch.Generator().manual_seed(1))

    torch.testing.assert_close(psi.abs(), psi0.abs())
    assert_about(int(changed_cells(psi0, psi).sum()), psi0.shape[0] * 128 * 128, rate)


def test_bit_flip_inverts_about_rate_of_the_cells() -> None:
    psi0, rate = random_state(grid_size=128, universes=2), 0.05
    psi = bit_flip(psi0, rate, torch.Generator().manual_seed(2))

    flipped = changed_cells(psi0, psi)
    assert torch.equal(psi[flipped], -psi0[flipped])
    assert_about(int(flipped.sum()), psi0.shape[0] * 128 * 128, rate)


@pytest.mark.parametrize("gate", [False, torch.tensor(False)])
def test_bit_flip_with_gate_closed_flips_nothing(gate) -> None:
    psi0 = random_state(grid_size=32)
    assert torch.equal(bit_flip(psi0, 0.5, torch.Generator().manual_seed(3), gate=gate), psi0)


def test_a_rollout_at_noise_level_zero_draws_no_noise() -> None:
    psi0, generator = random_state(), torch.Generator().manual_seed(4)
    start = generator.get_state()
    final = rollout(Stepper(ZeroOperator()), psi0, steps=3, gamma=0.2, noise=0.0, generator=generator).final
    torch.testing.assert_close(final, psi0)
    assert torch.equal(generator.get_state(), start)


@pytest.mark.parametrize("level", [0.5, 0.05, 0.013])
def test_apply_noise_is_a_phase_flip_then_a_gated_bit_flip_drawn_in_that_order(level: float) -> None:
    # The noise is drawn ahead of the step (so a compiled step can take it as input); the stream and the numbers
    # must stay those of phase_flip, a 20% gate, then bit_flip.
    psi0 = random_state(grid_size=64, universes=3)
    for seed in range(20):  # some with the bit-flip gate open, some closed
        generator = torch.Generator().manual_seed(seed)
        expected = phase_flip(psi0, level, generator)
        gate = torch.rand((), generator=generator) < 0.2
        expected = bit_flip(expected, 0.1 * level, generator, gate)
        assert torch.equal(apply_noise(psi0, level, torch.Generator().manual_seed(seed)), expected)


@pytest.mark.parametrize(("episode", "level"), [(0, 0.0), (1000, 0.025), (2000, 0.05), (5000, 0.05), (40, 0.001)])
def test_noise_curriculum_ramps_to_max_noise(episode: int, level: float) -> None:
    assert noise_level(episode) == pytest.approx(level)


def test_noise_is_off_below_the_floor() -> None:
    assert noise_level(39) == 0.0  # 0.05 * 39 / 2000 = 0.000975 < 0.001


def test_rollout_with_noise_never_waits_for_the_device() -> None:
    # torch.cuda.set_sync_debug_mode would be the direct check, but it needs a GPU; on the CPU, a torch-function
    # mode sees every torch call of the rollout and rejects those that read a device value back to the host.
    torch.manual_seed(0)
    operator = nn.Sequential(nn.Conv2d(2 * D_STATE, 8, 1), nn.ELU(), nn.Conv2d(8, 2 * D_STATE, 1))
    psi0, generator = random_state(), torch.Generator().manual_seed(5)
    with NoHostSync():
        result = rollout(Stepper(operator), psi0, steps=5, gamma=0.01, noise=0.5, generator=generator)
    assert result.final.shape == psi0.shape


def test_the_sync_detector_catches_boolean_indexing() -> None:
    psi = random_state()
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        psi[psi.abs() > 0.5] = 0


# --- losses -----------------------------------------------------------------------------------------------------------


def test_rot90_symmetric_state_has_zero_symmetry_loss() -> None:
    generator = torch.Generator().manual_seed(6)
    pattern = torch.rand(1, 8, 8, D_STATE, generator=generator)
    magnitude = sum(torch.rot90(pattern, k, dims=(1, 2)) for k in range(4))  # invariant under a quarter turn
    phase = torch.rand(magnitude.shape, generator=generator) * 2 * math.pi  # any phase: only |psi| is scored
    psi = torch.polar(magnitude, phase)

    assert symmetry(psi).item() == pytest.approx(0.0, abs=1e-10)
    assert symmetry(torch.polar(pattern, phase)).item() > 1e-3


def test_survival_is_zero_when_eighty_percent_of_the_energy_remains() -> None:
    initial = random_state()
    assert survival(initial * math.sqrt(0.8), initial).item() == pytest.approx(0.0, abs=1e-6)
    assert survival(initial, initial).item() == pytest.approx(0.2, abs=1e-6)


def test_complexity_falls_as_the_density_gains_contrast() -> None:
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2  # (8, 8) of 0 and 1
    scores = []
    for contrast in (0.1, 0.5, 0.9):
        density = 1.0 + contrast * (2 * checkerboard - 1)  # (8, 8)
        psi = torch.complex(density[None, :, :, None].expand(1, 8, 8, D_STATE), torch.zeros(1, 8, 8, D_STATE))
        scores.append(complexity(psi).item())
    assert scores[0] > scores[1] > scores[2]


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_reports_finite_loss_and_the_three_scores(name: str) -> None:
    initial = random_state(seed=7)
    parts = compute_loss(name, random_state(seed=8), initial)
    for key in ("loss", "survival", "symmetry", "complexity"):
        assert parts[key].ndim == 0
        assert torch.isfinite(parts[key]), key


def test_unknown_loss_is_rejected() -> None:
    state = random_state()
    with pytest.raises(ValueError, match="not one of evolutionary"):
        compute_loss("entropy", state, state)


def test_combined_metric_is_ten_survival_plus_five_symmetry() -> None:
    parts = {"survival": torch.tensor(0.3), "symmetry": torch.tensor(0.02), "complexity": torch.tensor(9.0)}
    assert combined_metric(parts).item() == pytest.approx(10 * 0.3 + 5 * 0.02)


# --- initial states and seeding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", INITIAL_STATES)
def test_initial_state_kinds(kind: str) -> None:
    psi = initial_state(kind, 3, 8, 4, torch.Generator().manual_seed(9))
    assert psi.shape == (3, 8, 8, 4)
    assert psi.dtype == torch.complex64
    if kind == "zeros":
        assert not psi.abs().any()
    else:
        torch.testing.assert_close(cell_norm(psi), torch.ones(3, 8, 8, 1))


def test_unknown_initial_state_is_rejected() -> None:
    with pytest.raises(ValueError, match="not one of random"):
        initial_state("vacuum", 1, 8, 2, torch.Generator())


def draws(seed: int, episode: int, rank: int = 0) -> torch.Tensor:
    return torch.rand(16, generator=episode_generator(seed, episode, rank=rank))


def test_episode_generator_is_a_pure_function_of_seed_and_episode() -> None:
    assert torch.equal(draws(42, 3), draws(42, 3))
    assert not torch.equal(draws(42, 3), draws(42, 4))
    assert not torch.equal(draws(42, 3), draws(43, 3))
    assert not torch.equal(draws(42, 3), draws(42, 3, rank=1))
    assert not torch.equal(draws(1, 2), draws(2, 1)), "neighbouring seeds must not share episodes"
