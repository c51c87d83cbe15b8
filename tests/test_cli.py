"""The CLI as users run it: presets parse, the demo trains end to end, bad settings fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, demo_args, env_without_warnings, run_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from atheria_lightning.cli import AtheriaCLI, main
from atheria_lightning.module import QCAModule

# curriculum.yaml is a list of phases, built phase by phase in tests/test_curriculum.py.
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "curriculum.yaml")


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_and_builds_against_the_real_cli(preset: str, tmp_path: Path) -> None:
    cli = AtheriaCLI(
        run=False,
        args=["--config", str(CONFIGS / preset), "--run_root", str(tmp_path),
              "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"],
    )  # fmt: skip
    assert isinstance(cli.model, QCAModule)
    assert cli.datamodule.total_episodes > 0
    assert cli.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("preset", ["colab_free.yaml", "colab_pro.yaml", "kaggle.yaml"])
def test_gpu_presets_train_the_original_recommended_model(preset: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / preset), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for setting in ("architecture: UNET", "d_state: 8", "hidden_channels: 64", "grid_size: 64", "qca_steps: 100",
                    "gamma_decay: 0.01", "TimeLimitGuard", "SmartCheckpoint"):  # fmt: skip
        assert setting in printed, setting


def test_demo_trains_logs_and_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "episodes: 6 this session, 6 of 6 in the run" in out
    assert f"checkpoints: {run_dir(tmp_path)}/checkpoints" in out

    losses = scalars(run_dir(tmp_path) / "logs", "train/loss")
    assert [step for step, _ in losses] == list(range(6))
    assert all(torch.isfinite(torch.tensor(value)) for _, value in losses)
    assert scalars(run_dir(tmp_path) / "logs", "val/combined")

    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    model = QCAModule.load_from_checkpoint(ckpt, weights_only=True)
    assert model.hparams.hidden_channels == 4 and model.hparams.grid_size == 8
    state = torch.load(ckpt, weights_only=True)
    assert state["final_state"].shape == (8, 8, 2, 2)  # (H, W, d, real/imag)
    assert (tmp_path / "mirror" / "demo" / "checkpoints" / "MANIFEST.json").is_file()
    # The mirror's copy of the TensorBoard log has every episode (the CLI's logger flushes only every few seconds).
    assert scalars(tmp_path / "mirror" / "demo" / "logs", "train/loss") == losses


@pytest.mark.slow
def test_a_finished_run_says_so_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, episodes=3)) == 0
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=3)) == 0
    out = capsys.readouterr().out
    assert "run finished: episode 3 of 3" in out
    assert "exports made again" not in out, "the exports the run ended with are those of its final checkpoint"


@pytest.mark.slow
def test_a_finished_run_continues_when_given_more_episodes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, episodes=3)) == 0
    capsys.readouterr()
    assert main(demo_args(tmp_path, episodes=5)) == 0
    out = capsys.readouterr().out
    assert "resuming from episode 3 of 5" in out
    assert "episodes: 2 this session, 5 of 5 in the run" in out


def test_unknown_yaml_key_is_rejected_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, "--model.hiden_channels", "8")) == 2
    assert capsys.readouterr().err == (
        "atheria: error: model.hiden_channels is not a setting of atheria fit: did you mean model.hidden_channels?\n"
    )


#: Every command of ``atheria``, as a user would type it.
ALL_COMMANDS = ("fit", "validate", "curriculum", "export", "report", "status")


def test_help_lists_every_command_one_line_each(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ALL_COMMANDS:
        lines = [line for line in out.splitlines() if line.split()[:1] == [command]]
        assert len(lines) == 1 and len(lines[0].split()) > 3, (command, out)


def test_no_command_lists_the_commands_and_fails(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(f"  {command} " in err for command in ALL_COMMANDS), err


@pytest.mark.parametrize(("command", "hint"), [("fitt", "did you mean fit? "), ("train", "")])
def test_an_unknown_command_is_one_line(command: str, hint: str, capsys: pytest.CaptureFixture) -> None:
    assert main([command, "--config", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err == (
        f"atheria: error: command {command!r} is not one of {', '.join(ALL_COMMANDS)}: {hint}"
        "atheria --help says what each does\n"
    )


def test_help_of_a_command_still_shows_its_full_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: atheria [options] fit") and "--model.grid_size" in out and "--run_root" in out


@pytest.mark.slow
def test_console_script_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "atheria_lightning.cli", "--help"],
        capture_output=True, text=True, cwd=REPO, env=env_without_warnings(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for command in ALL_COMMANDS:
        assert f"\n  {command} " in result.stdout, result.stdout


@pytest.mark.slow
def test_console_script_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "atheria_lightning.cli", *demo_args(tmp_path, "--model.architecture", "FOO")],
        capture_output=True, text=True, cwd=REPO, env=env_without_warnings(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("atheria: error: model.architecture='FOO'")


def test_print_config_shows_settings_not_test_seams(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # clock, sleep (tests inject them with use_clock) and weights_only (always True) are not a user's to set.
    with pytest.raises(SystemExit) as ended:
        main(demo_args(tmp_path, "--print_config"))
    printed = capsys.readouterr().out
    assert ended.value.code == 0 and "max_hours" in printed and "monitor: val/loss" in printed
    for seam in ("clock:", "sleep:", "weights_only"):
        assert seam not in printed
