"""Logs GPU and system-RAM usage every few episodes and prints a one-line status, so a dying session shows why."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from atheria_lightning.callbacks.clock import UsesClock
from atheria_lightning.data import total_episodes
from atheria_lightning.errors import require
from atheria_lightning.loggers.scalars import send_to_loggers

__all__ = ["ResourceMonitor", "memory_percent", "read_memory"]

# GiB: the unit that Colab's and Kaggle's meters label "GB", so the logged numbers match what the user sees there.
BYTES_PER_GB = 2**30

GPU_EXTRA_HINT = 'pip install "atheria_lightning[gpu]"'


class ResourceMonitor(UsesClock, Callback):
    """Every ``every_n_episodes`` episodes, on global rank 0, logs GPU and system-RAM usage and prints one line:

    ``[episode 40/600] 0.52 s/episode | RAM 3.2 GB (20%) | GPU 85%, 4.1 GB allocated (5.0 reserved) | elapsed 1.20 h,
    remaining 7.80 h``

    System RAM is watched because running out of it is what kills a Colab session, not the GPU. The elapsed and
    remaining hours are the newest ``vm/elapsed_hours`` and ``vm/remaining_hours`` in
    ``trainer.callback_metrics`` (logged by the time-limit guard); without them, the line shows the time since fit
    started. Time is printed, never logged here.

    Each reading goes to the loggers once, at the episode it was taken, and into ``trainer.callback_metrics``
    (:func:`~atheria_lightning.loggers.send_to_loggers`). Through ``pl_module.log`` from this hook, Lightning kept
    the last reading and sent it again at every later logging step: a stale copy per episode in TensorBoard, and
    training-thread time every episode from the first report on (``benchmarks/RESULTS.md``, "What changed").

    Between reports the callback does nothing at all; a report reads host-side counters only (the caching
    allocator's statistics, NVML, ``/proc``), so it never waits for the GPU.

    Args:
        every_n_episodes: Report after every this many episodes of the run (counted by ``trainer.global_step``, so
            the count continues across resumed sessions).

    Raises:
        ConfigError: If ``every_n_episodes`` is not a positive integer.

    Logged keys (the GPU keys are absent, not zero, when the model is not on a CUDA device; ``vm/``: see
    :mod:`atheria_lightning.loggers.scalars`):

    ============================  =====================================================================
    ``vm/ram_used_gb``            System RAM in use (total minus available), GiB
    ``vm/ram_percent``            The same as a percentage of the total, as ``psutil`` reports it
    ``vm/gpu_mem_allocated_gb``   Memory held by tensors on the model's GPU, GiB
    ``vm/gpu_mem_reserved_gb``    Memory reserved by PyTorch's caching allocator on that GPU, GiB
    ``vm/gpu_util_percent``       GPU utilisation from NVML; needs ``nvidia-ml-py`` (the ``gpu`` extra)
    ============================  =====================================================================

    Example::

        trainer = Trainer(callbacks=[ResourceMonitor(every_n_episodes=10)])
    """

    def __init__(self, every_n_episodes: int = 10) -> None:
        require(
            isinstance(every_n_episodes, int) and every_n_episodes > 0,
            f"ResourceMonitor.every_n_episodes={every_n_episodes!r} must be a positive integer",
        )
        self.every_n_episodes = every_n_episodes
        self.clock: Callable[[], float] = time.monotonic
        self._fit_started: float | None = None
        # (episode, clock) of the previous report, or of the start of training: the base of the s/episode figure.
        # Nothing here is worth a checkpoint: after a resume the rate is measured afresh over the new session.
        self._last_report: tuple[int, float] | None = None
        self._warned_utilization = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = self.clock()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is restored from the checkpoint by now, so a resumed session's rate counts its own episodes.
        self._last_report = (trainer.global_step, self.clock())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        episode = trainer.global_step or batch_idx + 1
        if episode % self.every_n_episodes or not trainer.is_global_zero:
            return
        if self._last_report is not None and self._last_report[0] == episode:
            return  # a skipped non-finite episode leaves global_step where the previous report saw it
        metrics = self.read_resources(pl_module.device)
        send_to_loggers(trainer, metrics)
        now = self.clock()
        line = self.status_line(trainer, episode, now, metrics)
        self._last_report = (episode, now)
        progress_bar = trainer.progress_bar_callback
        # The progress bar's print writes above the bar instead of breaking it.
        (progress_bar.print if progress_bar is not None else print)(line)

    def read_resources(self, device: torch.device) -> dict[str, float]:
        """The ``vm/*`` values now: RAM always, the GPU keys only when ``device`` is a CUDA device."""
        metrics = read_memory(device)
        if device.type == "cuda":
            utilization = self._gpu_utilization(device)
            if utilization is not None:
                metrics["vm/gpu_util_percent"] = utilization
        return metrics

    def _gpu_utilization(self, device: torch.device) -> float | None:
        # torch.cuda.utilization asks NVML (pynvml) and maps the device through CUDA_VISIBLE_DEVICES for us.
        try:
            return float(torch.cuda.utilization(device))
        except ModuleNotFoundError:
            self._warn_once(f"GPU utilisation is not logged: NVML is missing; install it with {GPU_EXTRA_HINT}")
        except Exception as err:  # a monitoring read must never stop a day-long training
            self._warn_once(f"GPU utilisation is not logged: NVML failed ({err})")
        return None

    def _warn_once(self, message: str) -> None:
        if not self._warned_utilization:
            self._warned_utilization = True
            rank_zero_warn(message)

    def status_line(self, trainer: pl.Trainer, episode: int, now: float, metrics: dict[str, float]) -> str:
        """The console line of one report."""
        head = f"[episode {episode}{_total_suffix(trainer)}]"
        if self._last_report is not None and episode > self._last_report[0]:
            last_episode, last_time = self._last_report
            head += f" {(now - last_time) / (episode - last_episode):.2f} s/episode"
        parts = [head, f"RAM {metrics['vm/ram_used_gb']:.1f} GB ({metrics['vm/ram_percent']:.0f}%)"]
        if "vm/gpu_mem_allocated_gb" in metrics:
            parts.append(_gpu_text(metrics))
        parts.append(self._time_text(trainer, now))
        return " | ".join(parts)

    def _time_text(self, trainer: pl.Trainer, now: float) -> str:
        elapsed = trainer.callback_metrics.get("vm/elapsed_hours")
        if elapsed is None:
            started = self._fit_started if self._fit_started is not None else now
            return f"elapsed {(now - started) / 3600:.2f} h"
        text = f"elapsed {float(elapsed):.2f} h"
        remaining = trainer.callback_metrics.get("vm/remaining_hours")
        if remaining is not None and math.isfinite(float(remaining)):
            text += f", remaining {float(remaining):.2f} h"
        return text


def read_memory(device: torch.device) -> dict[str, float]:
    """RAM in use now (GiB and %) and, when ``device`` is a CUDA device, the memory PyTorch holds on it (GiB).

    Host-side counters only (``/proc`` through psutil, the caching allocator's statistics): it never waits for the
    GPU. Keys as :class:`ResourceMonitor` logs them.
    """
    memory = psutil.virtual_memory()
    metrics = {
        # total - available, not psutil's "used": it is what the percentage and the out-of-memory killer count.
        "vm/ram_used_gb": (memory.total - memory.available) / BYTES_PER_GB,
        "vm/ram_percent": float(memory.percent),
    }
    if device.type == "cuda":
        metrics["vm/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(device) / BYTES_PER_GB
        metrics["vm/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(device) / BYTES_PER_GB
    return metrics


def memory_percent(device: torch.device) -> dict[str, float]:
    """How full the memories that end a session are, in %: ``RAM`` always, ``GPU memory`` on a CUDA device.

    The GPU's figure is what PyTorch's caching allocator has reserved on it over the device's total: the memory
    that, once full, makes the next episode fail with "out of memory".
    """
    metrics = read_memory(device)
    percent = {"RAM": metrics["vm/ram_percent"]}
    if "vm/gpu_mem_reserved_gb" in metrics:
        total = torch.cuda.get_device_properties(device).total_memory / BYTES_PER_GB
        percent["GPU memory"] = 100.0 * metrics["vm/gpu_mem_reserved_gb"] / total
    return percent


def _total_suffix(trainer: pl.Trainer) -> str:
    """``/N`` for the run's episode count: the datamodule's ``total_episodes``, else ``max_steps``, else nothing."""
    total = total_episodes(trainer) or trainer.max_steps
    return f"/{total}" if total and total > 0 else ""


def _gpu_text(metrics: dict[str, float]) -> str:
    utilization = metrics.get("vm/gpu_util_percent")
    prefix = "GPU" if utilization is None else f"GPU {utilization:.0f}%,"
    allocated, reserved = metrics["vm/gpu_mem_allocated_gb"], metrics["vm/gpu_mem_reserved_gb"]
    return f"{prefix} {allocated:.1f} GB allocated ({reserved:.1f} reserved)"
