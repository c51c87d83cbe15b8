"""One table of bad configurations: each fails before training with one line naming the setting, and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import demo_args

from atheria_lightning.cli import main


def _callback(class_name: str, **init_args: object) -> str:
    args = ", ".join(f"{key}: {value}" for key, value in init_args.items())
    entry = f"    - class_path: atheria_lightning.callbacks.{class_name}\n      init_args: {{{args}}}\n"
    return "trainer:\n  callbacks:\n" + entry


# (id, command-line overrides, extra YAML or None, the message's start, exit code)
BAD_CONFIGS = [
    ("architecture", ["--model.architecture", "TRANSFORMER"], None,
     "model.architecture='TRANSFORMER' is not one of UNET, UNET_UNITARY, MLP, DEEP_QCA, UNET_CONVLSTM", 2),
    ("loss", ["--model.loss", "entropy"], None, "model.loss='entropy' is not one of evolutionary", 2),
    ("initial_state", ["--model.initial_state", "big_bang"], None, "model.initial_state='big_bang' is not one of", 2),
    ("grid_not_multiple_of_4", ["--model.grid_size", "30"], None,
     "model.grid_size=30 must be at least 8 and divisible by 4 for UNET", 2),
    ("grid_too_small", ["--model.grid_size", "4"], None, "model.grid_size=4 must be at least 8", 2),
    ("d_state", ["--model.d_state", "0"], None, "model.d_state=0 must be a positive integer", 2),
    ("hidden_channels", ["--model.hidden_channels", "-3"], None,
     "model.hidden_channels=-3 must be a positive integer", 2),
    ("qca_steps", ["--model.qca_steps", "0"], None, "model.qca_steps=0 must be a positive integer", 2),
    ("universes", ["--model.universes_per_episode", "0"], None,
     "model.universes_per_episode=0 must be a positive integer", 2),
    ("gamma_decay", ["--model.gamma_decay", "1.0"], None, "model.gamma_decay=1.0 must be in [0, 1)", 2),
    ("max_noise", ["--model.max_noise", "-0.1"], None, "model.max_noise=-0.1 must be in [0, 1)", 2),
    ("lr", ["--model.lr", "0"], None, "model.lr=0.0 must be > 0", 2),
    ("compile", ["--model.compile", "cuda-graph"], None,
     "model.compile='cuda-graph' is not one of off, default, reduce-overhead", 2),
    ("compile_scope", ["--model.compile_scope", "rollout"], None,
     "model.compile_scope='rollout' is not one of operator, step", 2),
    ("checkpoint_every", ["--model.checkpoint_every", "-1"], None, "model.checkpoint_every=-1 must be >= 0", 2),
    ("total_episodes", ["--data.total_episodes", "0"], None, "data.total_episodes=0 must be a positive integer", 2),
    ("val_every", ["--data.val_every_episodes", "0"], None, "data.val_every_episodes=0 must be a positive integer", 2),
    ("experiment_name", ["--experiment_name", "../escape"], None,
     "experiment_name='../escape' must be a plain folder name", 2),
    ("experiment_name_slash", ["--experiment_name", "a/b"], None,
     "experiment_name='a/b' must be a plain folder name", 2),
    ("resume", ["--resume", "/no/such/file.ckpt"], None, "resume='/no/such/file.ckpt' must be one of auto, never", 2),
    ("mirror_protocol", ["--mirror_url", "foo://bucket/runs"], None, "mirror_url", 2),
    ("guard_hours", [], _callback("TimeLimitGuard", max_hours=0), "TimeLimitGuard.max_hours=0", 2),
    ("guard_fraction_1", [], _callback("TimeLimitGuard", max_hours=1, emergency_fraction=1.0),
     "TimeLimitGuard.emergency_fraction=1.0 must be in (0, 1)", 2),
    ("guard_fraction_0", [], _callback("TimeLimitGuard", max_hours=1, emergency_fraction=0),
     "TimeLimitGuard.emergency_fraction=0", 2),
    ("top_k", [], _callback("SmartCheckpoint", top_k=0), "SmartCheckpoint.top_k=0 must be an integer >= 1", 2),
    ("checkpoint_interval", [], _callback("SmartCheckpoint", every_n_episodes=0),
     "SmartCheckpoint.every_n_episodes=0 must be a positive integer", 2),
    ("mirror_interval", [], _callback("MirrorSync", every_n_episodes=-5),
     "MirrorSync.every_n_episodes=-5 must be a positive integer", 2),
    ("monitor_interval", [], _callback("ResourceMonitor", every_n_episodes=0),
     "ResourceMonitor.every_n_episodes=0 must be a positive integer", 2),
    ("lightning_checkpoint", [],
     "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n",
     "trainer.callbacks lists Lightning's ModelCheckpoint: the run's checkpoints/ belongs to its run store", 2),
    # What jsonargparse refuses while parsing (TMP: the test's folder).
    ("wrong_type", ["--model.grid_size", "abc"], None, "model.grid_size='abc' must be an integer", 2),
    ("wrong_type_in_yaml", [], "model:\n  lr: fast\n", "model.lr='fast' must be a number", 2),
    ("not_a_choice", ["--trainer.precision", "17"], None,
     "trainer.precision='17' must be one of 64, 32, 16, transformer-engine", 2),
    ("no_value", ["--model.lr"], None, "--model.lr needs a value: a number", 2),
    ("unknown_key", ["--model.grid_sise", "8"], None,
     "model.grid_sise is not a setting of atheria fit: did you mean model.grid_size?", 2),
    # argparse would take it for --trainer.max_epochs and train with it.
    ("unknown_prefix_key", ["--trainer.max_epoch", "3"], None,
     "trainer.max_epoch is not a setting of atheria fit: did you mean trainer.max_epochs?", 2),
    ("unknown_key_in_yaml", [], "trainer:\n  max_epoch: 3\n",
     "trainer.max_epoch is not a setting of atheria fit: did you mean trainer.max_epochs?", 2),
    ("unknown_key_far_from_any", ["--model.colour", "red"], None,
     "model.colour is not a setting of atheria fit: atheria fit --help lists them", 2),
    ("yaml_syntax", [], "model:\n  grid_size: [8\n",
     "--config='TMP/extra.yaml' is not valid YAML: line 3, column 1: expected ',' or ']'", 2),
    ("missing_config", ["--config", "TMP/missing.yaml"], None,
     "--config='TMP/missing.yaml' is not a file: give a YAML preset", 2),
    # What the Trainer or the run store would refuse once the run folder exists, refused before.
    ("ckpt_path", ["--ckpt_path", "TMP/missing.ckpt"], None,
     "ckpt_path='TMP/missing.ckpt' is not a checkpoint file", 2),
    ("devices_0", ["--trainer.accelerator", "cpu", "--trainer.devices", "0"], None,
     "trainer.devices=0 is not accepted with the cpu accelerator: accepted: a positive number of processes", 2),
    ("accelerator_gpu", ["--trainer.accelerator", "gpu"], None,
     "trainer.accelerator='gpu' is not available on this machine: accepted here: cpu, auto", 2),
    ("accelerator_cuda", ["--trainer.accelerator", "cuda"], None,
     "trainer.accelerator='cuda' is not available on this machine: accepted here: cpu, auto", 2),
    ("accelerator_typo", ["--trainer.accelerator", "cpuu"], None, "trainer.accelerator='cpuu' is not one of cpu,", 2),
    ("run_root_is_a_file", ["--run_root", "TMP/extra.yaml"], "{}\n",
     "run_root='TMP/extra.yaml': TMP/extra.yaml is a file, not a folder", 2),
    ("run_dir_is_a_file", ["--run_root", "TMP", "--experiment_name", "extra.yaml"], "{}\n",
     "experiment_name='extra.yaml': TMP/extra.yaml is a file, not a folder", 2),
]  # fmt: skip

# These name what a machine with a GPU offers: there, they would be accepted.
NEEDS_NO_GPU = {"accelerator_gpu", "accelerator_cuda"}
HAS_GPU = torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.parametrize(
    ("overrides", "yaml", "message", "code"),
    [pytest.param(*c[1:], id=c[0], marks=pytest.mark.skipif(HAS_GPU and c[0] in NEEDS_NO_GPU, reason="has a GPU"))
     for c in BAD_CONFIGS],
)  # fmt: skip
def test_bad_configuration_fails_in_one_line_before_training(
    overrides: list[str], yaml: str | None, message: str, code: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [arg.replace("TMP", str(tmp_path)) for arg in overrides]
    if yaml is not None:
        (tmp_path / "extra.yaml").write_text(yaml)
        overrides = [*overrides, "--config", str(tmp_path / "extra.yaml")]
    assert main(demo_args(tmp_path, *overrides)) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"atheria: error: {message.replace('TMP', str(tmp_path))}") or (
        message == "mirror_url" and err.startswith("atheria: error: ") and "foo" in err
    ), err
    # The test's folder is also the working directory: nothing at all, not even a log, may appear in it.
    assert _written(tmp_path) == [], "nothing may be written"


def _written(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.name != "extra.yaml")


def test_a_read_only_run_root_fails_in_one_line_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
    else:  # root writes into any folder, whatever its mode: only a read-only mount refuses it
        read_only = Path("/proc/sys")
        if not read_only.is_dir() or os.access(read_only, os.W_OK):
            pytest.skip("running as root, and /proc/sys is not a read-only mount here")
    assert main(demo_args(tmp_path, "--run_root", str(read_only / "runs"))) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"atheria: error: run_root='{read_only}/runs' cannot be written: {read_only} is read-only here; give a "
        "writable folder (it is created when missing), or null for the platform default"
    ), err
    assert _written(tmp_path) in ([], ["read_only"]), "nothing may be written"


# The other commands parse with argparse: their mistakes are one line too (TMP: the test's folder).
OTHER_COMMANDS = [
    ("export_required", ["export"], "--ckpt_path is required by atheria export"),
    ("export_unknown", ["export", "--out", "m.ts", "--ckpt_path", "TMP/a.ckpt"],
     "--out is not a setting of atheria export: did you mean --output?"),
    ("report_required", ["report"], "RUN_DIR is required by atheria report"),
    ("report_unknown", ["report", "--outptu", "TMP", "TMP"],
     "--outptu is not a setting of atheria report: did you mean --output?"),
    ("curriculum_required", ["curriculum"], "--config FILE or --preset NAME is required by atheria curriculum"),
    ("curriculum_no_value", ["curriculum", "--config"], "--config: expected one argument"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in OTHER_COMMANDS], ids=[c[0] for c in OTHER_COMMANDS])
def test_other_commands_refuse_bad_options_in_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([arg.replace("TMP", str(tmp_path)) for arg in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"atheria: error: {message}") and "\n" not in err, err
    assert _written(tmp_path) == []


def test_colab_without_drive_mounted_refuses_the_default_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    args = demo_args(tmp_path)
    args[args.index("--mirror_url") + 1] = "auto"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: mirror_url=auto needs Google Drive mounted at /content/drive/MyDrive"), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resuming_with_another_operator_shape_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "2", episodes=6, val_every=3)) == 0
    capsys.readouterr()
    assert main(demo_args(tmp_path, "--model.hidden_channels", "8", episodes=6, val_every=3)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: model.hidden_channels=8 differs from the checkpoint's 4"), err
    assert "\n" not in err
