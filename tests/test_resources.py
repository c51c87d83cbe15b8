"""ResourceMonitor: RAM always, GPU keys only on a GPU, one status line per report, nothing between reports."""

from __future__ import annotations

import csv
import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from atheria_lightning.callbacks.resources import ResourceMonitor, memory_percent
from atheria_lightning.data import EpisodeDataModule
from atheria_lightning.errors import ConfigError
from atheria_lightning.module import QCAModule

GB = 2**30
RAM_KEYS = {"vm/ram_used_gb", "vm/ram_percent"}
GPU_KEYS = {"vm/gpu_util_percent", "vm/gpu_mem_allocated_gb", "vm/gpu_mem_reserved_gb"}


def fit(tmp_path: Path, *callbacks: Callback, logger: CSVLogger | bool = False) -> Trainer:
    """Six episodes of the tiniest model on the CPU, validating every three."""
    model = QCAModule(architecture="MLP", d_state=2, hidden_channels=4, grid_size=8, qca_steps=2)
    trainer = Trainer(
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        callbacks=list(callbacks),
    )
    trainer.fit(model, EpisodeDataModule(total_episodes=6, val_every_episodes=3))
    return trainer


def fake_clock(step_seconds: float):
    """A clock that advances ``step_seconds`` on every read."""
    ticks = itertools.count()
    return lambda: next(ticks) * step_seconds


class FakeGuard(Callback):
    """Stands in for the time-limit guard: it logs the two ``vm/*`` hours the monitor prints."""

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        trainer.callback_metrics.update({"vm/elapsed_hours": torch.tensor(1.2),
                                         "vm/remaining_hours": torch.tensor(7.8)})  # fmt: skip


class GPUModule:
    """Stands in for a LightningModule living on a GPU."""

    device = torch.device("cuda", 0)


def stub_trainer(global_step: int, is_global_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=global_step,
        is_global_zero=is_global_zero,
        callbacks=[],
        datamodule=None,
        max_steps=100,
        progress_bar_callback=None,
        callback_metrics={},
        loggers=[],
    )


def logged(trainer: SimpleNamespace) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA memory counters and NVML utilisation with fixed values, on a machine without a GPU."""
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GB)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 85)


@pytest.mark.parametrize("every_n_episodes", [0, -3, 2.5])
def test_every_n_episodes_must_be_positive_integer(every_n_episodes) -> None:
    with pytest.raises(ConfigError, match=r"ResourceMonitor\.every_n_episodes"):
        ResourceMonitor(every_n_episodes=every_n_episodes)


def test_cpu_fit_logs_ram_and_no_gpu_keys(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    trainer = fit(tmp_path, ResourceMonitor(every_n_episodes=2), logger=logger)

    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert RAM_KEYS <= set(rows[0])
    assert not GPU_KEYS & set(rows[0]), "without a GPU the GPU keys must be absent, not zero"
    readings = [row for row in rows if row["vm/ram_used_gb"]]
    # One row per reading, at the episode it was taken (episodes 2, 4, 6: steps 1, 3, 5), not repeated after it.
    assert [int(row["step"]) for row in readings] == [1, 3, 5]
    total_gb = psutil.virtual_memory().total / GB
    for row in readings:
        assert 0.0 < float(row["vm/ram_used_gb"]) < total_gb
        assert 0.0 < float(row["vm/ram_percent"]) <= 100.0
    assert RAM_KEYS <= set(trainer.callback_metrics)


def test_status_line_every_n_episodes_with_clock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Reads: fit start (t=0), train start (1 h), then one per report: episode 3 at 2 h, episode 6 at 3 h.
    fit(tmp_path, ResourceMonitor(every_n_episodes=3).use_clock(fake_clock(3600.0)))

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[episode")]
    assert len(lines) == 2
    assert lines[0].startswith("[episode 3/6] 1200.00 s/episode | RAM ")
    assert lines[0].endswith("| elapsed 2.00 h")
    assert lines[1].startswith("[episode 6/6] 1200.00 s/episode | RAM ")
    assert lines[1].endswith("| elapsed 3.00 h")
    assert "GPU" not in lines[0]


def test_status_line_takes_time_from_guard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit(tmp_path, FakeGuard(), ResourceMonitor(every_n_episodes=6))

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[episode")]
    assert len(lines) == 1
    assert lines[0].endswith("| elapsed 1.20 h, remaining 7.80 h")


@pytest.mark.usefixtures("fake_gpu")
def test_gpu_keys_from_cuda_and_nvml(capsys: pytest.CaptureFixture[str]) -> None:
    monitor, module, trainer = ResourceMonitor(every_n_episodes=10), GPUModule(), stub_trainer(global_step=10)
    monitor.on_train_start(trainer, module)
    trainer.global_step = 20
    monitor.on_train_batch_end(trainer, module, None, None, batch_idx=19)

    assert set(logged(trainer)) == RAM_KEYS | GPU_KEYS
    assert logged(trainer)["vm/gpu_util_percent"] == 85.0
    assert logged(trainer)["vm/gpu_mem_allocated_gb"] == 3.0
    assert logged(trainer)["vm/gpu_mem_reserved_gb"] == 5.0
    assert "[episode 20/100]" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.usefixtures("fake_gpu")
def test_missing_nvml_warns_once_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pynvml(device=None):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(torch.cuda, "utilization", no_pynvml)
    monitor, module = ResourceMonitor(every_n_episodes=10), GPUModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (10, 20, 30):
            trainer = stub_trainer(step)
            monitor.on_train_batch_end(trainer, module, None, None, batch_idx=step - 1)

    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert 'pip install "atheria_lightning[gpu]"' in messages[0]
    assert "vm/gpu_util_percent" not in logged(trainer)
    assert {"vm/gpu_mem_allocated_gb", "vm/gpu_mem_reserved_gb"} <= set(logged(trainer))


@pytest.mark.usefixtures("fake_gpu")
def test_nothing_read_between_reports_nor_off_rank_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reads = []
    real_virtual_memory = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: reads.append(1) or real_virtual_memory())
    monitor, module = ResourceMonitor(every_n_episodes=10), GPUModule()

    trainers = [stub_trainer(step) for step in range(1, 10)] + [stub_trainer(10, is_global_zero=False)]
    for trainer in trainers:
        monitor.on_train_batch_end(trainer, module, None, None, batch_idx=trainer.global_step - 1)
    assert not reads and not any(trainer.callback_metrics for trainer in trainers) and not capsys.readouterr().out

    # A skipped non-finite episode leaves global_step at 10: the second batch must not report again.
    for batch_idx in (9, 10):
        monitor.on_train_batch_end(stub_trainer(10), module, None, None, batch_idx=batch_idx)
    assert len(reads) == 1
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.usefixtures("fake_gpu")
def test_memory_percent_reads_ram_and_the_gpu_memory_reserved_over_its_total(monkeypatch: pytest.MonkeyPatch) -> None:
    # The measurement --notify's memory alert shares with this monitor: reserved 5 GB of a 20 GB device is 25%.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=20 * GB))
    percent = memory_percent(torch.device("cuda", 0))
    assert percent["GPU memory"] == 25.0
    assert set(percent) == {"RAM", "GPU memory"} and 0.0 < percent["RAM"] <= 100.0
    assert set(memory_percent(torch.device("cpu"))) == {"RAM"}
