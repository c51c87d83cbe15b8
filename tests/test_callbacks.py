"""One contract over every callback (built from YAML, fit twice, state round trip) and their bad settings."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, demo_args, plain_state
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from atheria_lightning.callbacks import (
    EpisodeProgressBar,
    LivePlot,
    MirrorSync,
    ResourceMonitor,
    RunSummary,
    SmartCheckpoint,
    TimeLimitGuard,
    TrainingLog,
)
from atheria_lightning.cli import AtheriaCLI, main
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.module import NonFiniteTrainingError, QCAModule
from atheria_lightning.platform import Platform, default_mirror_url, default_run_root, detect_platform
from atheria_lightning.store import RunStore, UsesRunStore

# (class, init_args as a preset would write them)
CALLBACKS = [
    (TimeLimitGuard, {"max_hours": 2.0, "emergency_fraction": 0.8}),
    (SmartCheckpoint, {"top_k": 3, "every_n_episodes": 2}),
    (MirrorSync, {"every_n_episodes": 2}),
    (ResourceMonitor, {"every_n_episodes": 2}),
    (EpisodeProgressBar, {}),
    (RunSummary, {"run_dir": "runs/x"}),
    (TrainingLog, {"phase": "Fase1_Vacuum_Stability"}),
    pytest.param(LivePlot, {"plot_every_n_episodes": 2}, marks=pytest.mark.slow, id="LivePlot"),  # a plot process
]


def _yaml(tmp_path: Path, cls: type, init_args: dict) -> str:
    lines = ["trainer:", "  callbacks:", f"    - class_path: {cls.__module__}.{cls.__name__}"]
    if init_args:
        lines.append("      init_args:")
        lines += [f"        {key}: {value}" for key, value in init_args.items()]
    path = tmp_path / f"{cls.__name__}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _tiny_fit(callback: Callback, root: Path, episodes: int = 4) -> Trainer:
    """A plain Trainer in ``root``, with a run store of ``root`` for the callbacks that act on the run's files."""
    store = RunStore(root)
    callbacks = [callback] if isinstance(callback, SmartCheckpoint) else [callback, SmartCheckpoint(every_n_episodes=2)]
    if isinstance(callback, LivePlot):  # it draws what the run's log records, handed over as the CLI does
        callbacks.insert(0, TrainingLog())
        callback.use_log(callbacks[0])
    for each in callbacks:
        if isinstance(each, UsesRunStore):
            each.use_store(store)
    trainer = Trainer(
        max_epochs=-1, logger=False, default_root_dir=str(root), val_check_interval=2, check_val_every_n_epoch=None,
        enable_progress_bar=isinstance(callback, EpisodeProgressBar), num_sanity_val_steps=0,
        plugins=[store.checkpoint_io], callbacks=callbacks,
    )  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=episodes, val_every_episodes=2))
    store.close()
    return trainer


@pytest.mark.parametrize(("cls", "init_args"), CALLBACKS, ids=[getattr(c[0], "__name__", None) for c in CALLBACKS])
def test_callback_contract(cls: type, init_args: dict, tmp_path: Path) -> None:
    # 1. constructible from a YAML preset, through the real CLI
    args = ["--config", str(CONFIGS / "demo.yaml"), "--config", _yaml(tmp_path, cls, init_args),
            "--run_root", str(tmp_path / "runs"), "--mirror_url", str(tmp_path / "mirror")]  # fmt: skip
    cli = AtheriaCLI(run=False, args=args)
    built = [cb for cb in cli.trainer.callbacks if type(cb) is cls]
    assert len(built) == 1
    for key, value in init_args.items():
        assert getattr(built[0], key) == value
    # 2. the same instance survives two fits (a notebook re-running a cell), and closes idempotently
    callback = built[0]
    for attempt in range(2):
        trainer = _tiny_fit(callback, tmp_path / f"fit{attempt}")
        assert trainer.state.finished
    callback.teardown(trainer, trainer.lightning_module, "fit")
    # 3. its state round-trips through a checkpoint file, loaded as a resume loads it (weights_only=True)
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = cls(**init_args)
    twin.load_state_dict(state)
    if isinstance(callback, TimeLimitGuard):
        assert twin.sessions == callback.sessions + 1
        assert twin.previous_sessions_seconds == pytest.approx(state["total_training_seconds"])
    else:  # Lightning does not restore the score of the moment (current_score), only the bookkeeping
        assert plain_state({k: v for k, v in twin.state_dict().items() if k != "current_score"}) == plain_state(
            {k: v for k, v in state.items() if k != "current_score"}
        )


def test_missing_optional_mirror_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # importing it now fails, installed or not
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(_registry, protocol, raising=False)
    assert main(demo_args(tmp_path, "--mirror_url", "s3://bucket/atheria")) == 2
    assert 'pip install "atheria_lightning[s3]"' in capsys.readouterr().err


class NaNLoss(Callback):
    """Makes chosen episodes' losses NaN, as an exploding operator would, and records the weights around them."""

    def __init__(self, episodes: set[int]) -> None:
        self.episodes = episodes
        self.weights_before: dict[int, list[torch.Tensor]] = {}
        self.weights_after: dict[int, list[torch.Tensor]] = {}

    def setup(self, trainer: Trainer, pl_module: QCAModule, stage: str) -> None:
        run_episode = pl_module.run_episode

        def poisoned(seed: int, episode: int, noise: float):
            parts, final = run_episode(seed, episode, noise)
            if episode in self.episodes:
                parts["loss"] = parts["loss"] * float("nan")
            return parts, final

        pl_module.run_episode = poisoned

    def on_train_batch_start(self, trainer: Trainer, pl_module: QCAModule, batch: dict, batch_idx: int) -> None:
        self.weights_before[batch["episode"]] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: Trainer, pl_module: QCAModule, outputs, batch: dict, batch_idx: int) -> None:
        self.weights_after[batch["episode"]] = [p.detach().clone() for p in pl_module.parameters()]


def test_a_non_finite_episode_is_skipped_and_counted(tmp_path: Path) -> None:
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    nan = NaNLoss({2})
    trainer = Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path), callbacks=[nan], limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=5))
    assert model.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    unchanged = [torch.equal(a, b) for a, b in zip(nan.weights_before[2], nan.weights_after[2], strict=True)]
    assert all(unchanged), "the non-finite episode must not change the weights"
    changed = [torch.equal(a, b) for a, b in zip(nan.weights_before[3], nan.weights_after[3], strict=True)]
    assert not all(changed), "the next finite episode trains again"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_run_that_only_produces_non_finite_losses_stops_with_a_clear_error(tmp_path: Path) -> None:
    model = QCAModule(
        architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2, max_nonfinite_episodes=3
    )
    trainer = Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path), callbacks=[NaNLoss(set(range(100)))],
                      limit_val_batches=0)  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive episodes had a non-finite loss"):
        trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=50))
    assert model.nonfinite_skipped == 3


@pytest.mark.parametrize(
    ("env", "platform", "run_root", "mirror"),
    [
        ({}, Platform.LOCAL, "./runs", None),
        ({"COLAB_RELEASE_TAG": "release-colab_20261101"}, Platform.COLAB, "/content/atheria_runs",
         "/content/drive/MyDrive/Atheria"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, Platform.KAGGLE, "/kaggle/working/atheria_runs", None),
    ],
)  # fmt: skip
def test_platform_defaults(env: dict, platform: Platform, run_root: str, mirror: str | None, monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert detect_platform() is platform
    assert default_run_root() == run_root
    assert default_mirror_url() == mirror


def test_a_non_finite_validation_is_never_kept_as_a_best_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import atheria_lightning.module as module

    poisoned = {"on": False}

    class NaNValidation(Callback):
        def on_validation_start(self, trainer: Trainer, pl_module: QCAModule) -> None:
            poisoned["on"] = trainer.global_step == 4  # the second validation of the run goes non-finite

    real_metric = module.combined_metric
    monkeypatch.setattr(module, "combined_metric", lambda p: real_metric(p) * (float("nan") if poisoned["on"] else 1))
    checkpoint = SmartCheckpoint(top_k=5, every_n_episodes=2, monitor="val/combined")
    trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                      callbacks=[NaNValidation(), checkpoint])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=6, val_every_episodes=2))
    best = sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert best == ["best-e000002.ckpt", "best-e000006.ckpt"]
    entries = json.loads((tmp_path / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert all(math.isfinite(entry["metric"]) for name, entry in entries.items() if name.startswith("best-"))
    assert entries["last.ckpt"]["episode"] == 6, "the state of the NaN validation was not kept as last.ckpt either"


def test_last_checkpoint_is_written_once_per_episode_and_copies_a_new_best(tmp_path: Path, monkeypatch) -> None:
    # last.ckpt is due every 2 episodes, validation runs every 4 and each one finds a new best (a falling metric).
    # At 2 and 6 the state waits one episode for its proof (the next loss); at 4 and 8 last.ckpt waits for the
    # validation, and the best checkpoint is a copy of it, made by the writer thread.
    import atheria_lightning.module as module
    from atheria_lightning.store.writer import Writer

    writes: list[tuple[str, str]] = []
    write_file, copy = Writer._write, Writer._copy

    def recorded_write(self, save, data) -> None:
        writes.append((save.name, f"save@{save.episode}"))
        write_file(self, save, data)

    def recorded_copy(self, source: str, target: str, episode: int, metric: float) -> None:
        writes.append((target, f"copy of {source}@{episode}"))
        copy(self, source, target, episode, metric)

    monkeypatch.setattr(Writer, "_write", recorded_write)
    monkeypatch.setattr(Writer, "_copy", recorded_copy)
    falling = iter(range(1000, 0, -1))
    real_metric = module.combined_metric
    monkeypatch.setattr(module, "combined_metric", lambda parts: real_metric(parts) * 0 + next(falling))
    checkpoint = SmartCheckpoint(top_k=5, every_n_episodes=2, monitor="val/combined")
    trainer = Trainer(max_epochs=-1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                      callbacks=[checkpoint])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=8, val_every_episodes=4))

    assert writes == [
        ("last.ckpt", "save@2"),
        ("last.ckpt", "save@4"), ("best-e000004.ckpt", "copy of last.ckpt@4"),
        ("last.ckpt", "save@6"),
        ("last.ckpt", "save@8"), ("best-e000008.ckpt", "copy of last.ckpt@8"),
    ]  # fmt: skip
    files = json.loads((tmp_path / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert files["last.ckpt"]["episode"] == 8 and files["last.ckpt"]["kind"] == "last"
    assert files["last.ckpt"]["sha256"] == files["best-e000008.ckpt"]["sha256"]
    assert files["best-e000008.ckpt"]["metric"] == files["last.ckpt"]["metric"] is not None
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["atheria"] == {"episode": 8, "metric": files["last.ckpt"]["metric"], "monitor": "val/combined"}
    for name, value in model.state_dict().items():
        assert torch.equal(state["state_dict"][name], value.cpu()), name


class RecordingLogger(Logger):
    """Every ``log_metrics`` call: (step, keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, set[str]]] = []

    name, version = "recording", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        assert all(isinstance(value, (int, float)) for value in metrics.values())
        self.calls.append((step, set(metrics)))

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass


@pytest.mark.parametrize("every", [1, 2])
def test_every_train_scalar_reaches_the_loggers_at_the_step_of_its_loss(tmp_path: Path, every: int) -> None:
    logger = RecordingLogger()
    trainer = Trainer(max_epochs=-1, logger=logger, log_every_n_steps=every, enable_progress_bar=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path), limit_val_batches=0)  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=6))
    keys = {"train/loss", "train/survival", "train/symmetry", "train/complexity", "train/noise_level",
            "train/nonfinite_skipped"}  # fmt: skip
    by_step: dict[int, set[str]] = {}
    for step, names in logger.calls:
        by_step.setdefault(step, set()).update(names)
    logged = {step for step, names in by_step.items() if keys <= names}
    assert logged == {step for step in range(6) if (step + 1) % every == 0 or step == 5}
    assert all(not (names & keys) for step, names in by_step.items() if step not in logged)
    assert {"train/survival", "train/noise_level"} <= set(trainer.callback_metrics)


def test_as_floats_reads_numbers_and_tensors_in_order_whatever_their_device() -> None:
    from atheria_lightning.loggers import as_floats

    # callback_metrics mixes the module's tensors (on its device) with numbers sent from the host.
    values: list[object] = [1, torch.tensor(2.5, requires_grad=True), 3.25, torch.tensor([4.0], dtype=torch.float64)]
    expected = [1.0, 2.5, 3.25, 4.0]
    if torch.cuda.is_available():
        values, expected = [torch.tensor(0.5, device="cuda"), *values], [0.5, *expected]
    assert as_floats(values) == expected
    assert as_floats([]) == []


@pytest.mark.parametrize(("interval", "shown"), [(0.0, set(range(9))), (3600.0, {0, 1, 8})])
def test_the_progress_bar_redraws_at_most_every_min_interval_s_and_always_at_the_end(
    capsys: pytest.CaptureFixture, interval: float, shown: set[int]
) -> None:
    trainer = Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=[EpisodeProgressBar(min_interval_s=interval)])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=8))
    frames = capsys.readouterr().out.split("\r")
    assert {int(m.group(1)) for f in frames if (m := re.search(r"\| (\d+)/8 \[", f))} == shown
    assert "train/loss=" in frames[-1] or "train/loss=" in frames[-2]


def test_a_negative_progress_interval_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match=r"EpisodeProgressBar.min_interval_s=-1 must be >= 0 seconds"):
        EpisodeProgressBar(min_interval_s=-1)


def test_the_progress_bar_counts_episodes_of_the_whole_run_and_shows_the_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _tiny_fit(EpisodeProgressBar(), tmp_path / "first", episodes=2)
    resumed = Trainer(max_epochs=-1, logger=False, default_root_dir=str(tmp_path / "resumed"), num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[EpisodeProgressBar()])  # fmt: skip
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    resumed.fit(model, datamodule=EpisodeDataModule(total_episodes=4),
                ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt"))  # fmt: skip
    shown = capsys.readouterr().out.strip().split("\r")[-1]  # Lightning's bars write to stdout
    assert "episode: 100%" in shown and "4/4" in shown, "episodes 3 and 4 of 4, counted from the resumed episode"
    assert "train/loss=" in shown


def test_a_state_whose_next_episode_is_non_finite_is_never_kept(tmp_path: Path, caplog) -> None:
    # No validation proves the saves here: each waits one episode for its proof. Episodes 5 and 6 (indices 4 and 5)
    # give NaN losses, so the state saved after episode 4 is dropped, and last.ckpt keeps episode 2.
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    real_run = model.run_episode

    def poisoned(seed: int, episode: int, noise: float):
        parts, final = real_run(seed, episode, noise)
        if episode in (4, 5):
            parts = {**parts, "loss": parts["loss"] * float("nan")}
        return parts, final

    model.run_episode = poisoned
    trainer = Trainer(
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[SmartCheckpoint(every_n_episodes=2)],
    )
    with caplog.at_level("WARNING", logger="atheria_lightning.store"):
        trainer.fit(model, datamodule=EpisodeDataModule(total_episodes=6, val_every_episodes=100))
    entries = json.loads((tmp_path / "checkpoints" / "MANIFEST.json").read_text())["files"]
    assert entries["last.ckpt"]["episode"] == 2
    assert "the state of episode 4 led to a non-finite loss: not saved; last.ckpt keeps episode 2" in caplog.text
