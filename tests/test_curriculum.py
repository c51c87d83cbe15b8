"""``atheria curriculum``: phases in their own folders, weights carried over, done phases skipped, shared budget."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, FakeEpisodeClock, env_without_warnings
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback

from atheria_lightning.callbacks import TimeLimitGuard, time_guard
from atheria_lightning.curriculum import PHASE_DONE, PhaseCLI, load_curriculum, main
from atheria_lightning.module import QCAModule

pytestmark = pytest.mark.slow  # trains in subprocesses or over several sessions: out of the quick loop

TINY_MODEL = "{architecture: UNET, d_state: 2, hidden_channels: 4, grid_size: 8, qca_steps: 2, lr: 0.01}"
TWO_PHASES = """
  - name: small
  - name: wide
    load_from_phase: small
    model: {hidden_channels: 8}
"""


def write_curriculum(tmp_path: Path, phases: str = TWO_PHASES, max_hours: float = 1.0) -> str:
    """A two-phase curriculum on tiny sizes: phase 1 UNET d_state 2, hidden 4, grid 8; phase 2 hidden 8."""
    path = tmp_path / "curriculum.yaml"
    path.write_text(f"""experiment_name: tiny
run_root: {tmp_path / "runs"}
mirror_url: null
max_hours: {max_hours}
trainer:
  accelerator: cpu
  precision: 32-true
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: atheria_lightning.callbacks.TimeLimitGuard
      init_args: {{max_hours: 99}}   # replaced by max_hours
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{top_k: 2, every_n_episodes: 2}}
model: {TINY_MODEL}
data: {{total_episodes: 4, seed: 42, val_every_episodes: 2}}
phases: {phases}
""")
    return str(path)


def phase_dir(tmp_path: Path, phase: str) -> Path:
    return tmp_path / "runs" / "tiny" / phase


def manifest_files(tmp_path: Path, phase: str) -> dict:
    return json.loads((phase_dir(tmp_path, phase) / "checkpoints" / "MANIFEST.json").read_text())["files"]


class StartWeights(Callback):
    """Copies each phase's weights at the start of training, keyed by the phase's folder name."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        state = {name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()}
        self.seen[Path(trainer.default_root_dir).name] = state


def test_phase_two_starts_from_phase_one_best_checkpoint_and_a_rerun_skips_both(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_curriculum(tmp_path)
    start = StartWeights()
    assert main(["--config", config], trainer_defaults={"callbacks": [start]}) == 0
    out = capsys.readouterr().out
    assert "curriculum tiny: all 2 phases done" in out

    # The source is phase 1's best checkpoint: the lowest val/combined in its manifest.
    best_name, _ = min(((n, e) for n, e in manifest_files(tmp_path, "small").items() if n.startswith("best-")),
                       key=lambda item: item[1]["metric"])  # fmt: skip
    best = torch.load(phase_dir(tmp_path, "small") / "checkpoints" / best_name, weights_only=True)["state_dict"]
    wide = start.seen["wide"]
    shared = [name for name in wide if name in best and best[name].shape == wide[name].shape]
    assert shared == ["operator.outc.bias"]  # the hidden width changes every other tensor's shape
    seed_everything(42)
    fresh = QCAModule(d_state=2, hidden_channels=8, grid_size=8, qca_steps=2).state_dict()
    for name in shared:
        assert torch.equal(wide[name], best[name]), name
        assert not torch.equal(wide[name], fresh[name]), f"{name} was not trained in phase 1 or not copied"

    assert f"phase wide: initialised from phase small {best_name}" in out
    assert f"copied 1 of {len(wide)} tensors (name and shape match), skipped {len(wide) - 1}:" in out
    assert "  skipped operator.inc.0.weight: (4, 4, 3, 3) -> (8, 4, 3, 3)" in out
    for phase in ("small", "wide"):  # the run folder layout of `atheria fit`, one per phase
        assert manifest_files(tmp_path, phase)["last.ckpt"]["episode"] == 4
        done = json.loads((phase_dir(tmp_path, phase) / PHASE_DONE).read_text())
        assert done["episodes"] == 4 and done["best_checkpoint"].startswith("best-")
    assert json.loads((phase_dir(tmp_path, "wide") / PHASE_DONE).read_text())["loaded_from_phase"] == "small"

    again = StartWeights()
    assert main(["--config", config], trainer_defaults={"callbacks": [again]}) == 0
    out = capsys.readouterr().out
    assert "phase 1/2 small: done (4 episodes" in out and "phase 2/2 wide: done (4 episodes" in out
    assert again.seen == {}, "a done phase must not train again"


def test_an_interrupted_phase_resumes_mid_phase_and_the_next_one_waits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_curriculum(tmp_path)
    assert main(["--config", config, "--trainer.max_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "phase 1/2 small: stopped at episode 2 of 4; run the same command again to continue" in out
    assert not (phase_dir(tmp_path, "small") / PHASE_DONE).exists()
    assert not phase_dir(tmp_path, "wide").exists(), "the next phase must not start after an early stop"

    assert main(["--config", config]) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 2 of 4" in out
    assert "phase wide: initialised from phase small" in out
    assert (phase_dir(tmp_path, "wide") / PHASE_DONE).exists()


def test_the_time_budget_is_shared_by_the_phases_of_one_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    clock = FakeEpisodeClock(60.0)  # a session clock shared by every phase of the process
    monkeypatch.setattr(time_guard, "time", types.SimpleNamespace(monotonic=clock, time=time.time))
    monkeypatch.setattr(time_guard, "process_age_seconds", lambda: clock.now)  # the session started at 0
    # 0.1 h = 360 s, stop point 90% = 324 s: phase 1 (4 x 60 s) fits; phase 2 has time for one episode only.
    config = write_curriculum(tmp_path, max_hours=0.1)
    args = ["--config", config]
    assert main(args, trainer_defaults={"callbacks": [clock]}) == 0
    out = capsys.readouterr().out
    assert "phase 2/2 wide: stopped at episode 1 of 4; run the same command again to continue" in out
    assert (phase_dir(tmp_path, "small") / PHASE_DONE).exists()

    clock.now = 330.0  # still the same session, past the stop point: nothing starts
    assert main(args, trainer_defaults={"callbacks": [clock]}) == 0
    assert "phase 2/2 wide: not started, the session's time budget is spent" in capsys.readouterr().out

    clock.now = 0.0  # a new session: phase 1 is done, phase 2 continues where it stopped
    assert main(args, trainer_defaults={"callbacks": [clock]}) == 0
    out = capsys.readouterr().out
    assert "phase 1/2 small: done" in out and "resuming from episode 1 of 4" in out
    assert "curriculum tiny: all 2 phases done" in out


BAD_CURRICULA = [
    ("  - {name: a}\n  - {name: b, load_from_phase: c}",
     "phases[1].load_from_phase='c' is not a phase of this curriculum; earlier phases: a"),
    ("  - {name: a, load_from_phase: b}\n  - {name: b}",
     "phases[0].load_from_phase='b' runs after this phase; earlier phases: none"),
    ("  - {name: a}\n  - {name: b, load_from_phase: b}", "phases[1].load_from_phase='b' is this phase itself"),
    ("  - {name: a}\n  - {name: a}", "phases[1].name='a' is used twice"),
    (" []", "phases=[] must be a non-empty list of phases"),
    ("  - {name: a/b}", "phases[0].name='a/b' must be a plain folder name"),
    ("  - {name: '..'}", "phases[0].name='..' must be a plain folder name"),
    ("  - {load_from_phase: a}", "phases[0].name=None must be a plain folder name"),
    ("  - {name: a, modle: {d_state: 2}}", "phases[0].modle is not one of name, load_from_phase, trainer, model, data"),
    # Found by building every phase's CLI before the first one runs: phase a must not train.
    ("  - {name: a}\n  - {name: b, model: {hidden_channels: -3}}",
     "phase 'b': model.hidden_channels=-3 must be a positive integer"),
    ("  - {name: a}\n  - {name: b, model: {hiden_channels: 8}}",
     "phase 'b': model.hiden_channels is not a setting of atheria fit: did you mean model.hidden_channels?"),
]  # fmt: skip


@pytest.mark.parametrize(("phases", "message"), BAD_CURRICULA, ids=[m.split(" ")[0] for _, m in BAD_CURRICULA])
def test_bad_curricula_fail_in_one_line_before_any_phase(
    phases: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--config", write_curriculum(tmp_path, phases="\n" + phases)]) == 2
    assert_one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists(), "nothing may be written before the curriculum is accepted"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume", "never"], "--resume is not an option of atheria curriculum"),
        (["--max_hours", "0"], "max_hours=0 must be a number of hours > 0"),
        (["--experiment_name", "../x"], "experiment_name='../x' must be a plain folder name"),
        (["--model.grid_size", "30"], "phase 'small': model.grid_size=30 must be at least 8 and divisible by 4"),
    ],
)
def test_bad_command_line_overrides_fail_in_one_line(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--config", write_curriculum(tmp_path), *extra]) == 2
    assert_one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists()


def assert_one_line_error(capsys: pytest.CaptureFixture, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"atheria: error: {message}"), err


def test_the_console_command_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    config = write_curriculum(tmp_path, phases="\n  - {name: a}\n  - {name: a}")
    result = subprocess.run(
        [sys.executable, "-m", "atheria_lightning.curriculum", "--config", config],
        capture_output=True, text=True, cwd=REPO, env=env_without_warnings(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "atheria: error: phases[1].name='a' is used twice: names must differ"


def test_the_curriculum_preset_builds_every_phase_against_the_real_cli(tmp_path: Path) -> None:
    curriculum = load_curriculum(str(CONFIGS / "curriculum.yaml"), {"run_root": str(tmp_path), "mirror_url": None})
    assert [(p.name, p.load_from_phase) for p in curriculum.phases] == [
        ("Fase1_Vacuum_Stability", None), ("Fase2_Matter_Emergence", "Fase1_Vacuum_Stability")]  # fmt: skip
    expected = [
        {"d_state": 4, "hidden_channels": 32, "grid_size": 32, "qca_steps": 50, "lr": 1e-4, "gamma_decay": 0.001},
        {"d_state": 4, "hidden_channels": 64, "grid_size": 64, "qca_steps": 100, "lr": 5e-5, "gamma_decay": 0.01},
    ]
    for phase, model, episodes in zip(curriculum.phases, expected, (500, 1000), strict=True):
        cli = PhaseCLI(
            run=False,
            args=["--config", curriculum.phase_config(phase), "--trainer.accelerator", "cpu",
                  "--trainer.precision", "32-true"],
        )  # fmt: skip
        assert {key: cli.model.hparams[key] for key in model} == model
        assert cli.datamodule.total_episodes == episodes
        guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, TimeLimitGuard)]
        assert [guard.max_hours for guard in guards] == [curriculum.max_hours] == [10.0]
        assert cli.run_dir == str(tmp_path / "atheria_curriculum" / phase.name)
