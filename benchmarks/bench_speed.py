"""Speed and memory of a training episode, ours beside the original loop measured in the same run: JSON lines.

Every row names its device, configuration and variant and gives seconds per episode (wall clock, and CPU seconds of
the process), million cell-steps per second (universes x grid^2 x steps per second: the figure that compares batches
of any size) and the peak memory (CUDA ``max_memory_allocated`` on a GPU; on the CPU the process's peak RSS,
indicative only). Where the original loop (``../shared/bench/anchor_original.py``: its ``run()`` imported and run in
this process) was measured in the same run, a row also gives ``speed_vs_original``: our cell-steps per second over
the original's (> 1: ours is faster).

Variants of ours: ``bare`` (the same ``QCAModule`` in a Python loop: ``run_episode``, backward, clip, AdamW; no
Lightning), ``bare+validation`` (the same loop doing the user's run's validation too: every
``data.val_every_episodes`` episodes, the ``data.val_universes`` fixed validation universes rolled out through
``QCAModule.run_episode`` under ``torch.inference_mode``, as ``validation_step`` does under Lightning's
``inference_mode``; the settings are read from ``configs/demo.yaml``), ``lightning`` (a plain ``Trainer``: no
logger, callbacks or validation), ``lightning+callbacks`` (the demo preset through ``AtheriaCLI``: every callback,
the logger, validation and the progress bar on; needs jsonargparse, so CPU only here). Our episodes are numbered
from 1000, as the original's are, so both run with the noise on.

Target 4 ("the framework costs nothing that matters") compares ``lightning+callbacks`` with ``bare+validation``:
the two do the same work apart from the framework and its callbacks. The ratio against the plain ``bare`` loop
(no validation) is reported beside it, labelled as such.

Usage, from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_speed.py cpu --threads 1      # the issue's CPU rows (~15 min)
    PYTHONPATH=. python benchmarks/bench_speed.py original --config standard
    PYTHONPATH=. python benchmarks/bench_speed.py ours --config standard --variant lightning \\
        --universes 16,32 --precision bf16-mixed --compile default --original-from rows.jsonl

``benchmarks/gpu_suite.sh`` runs the whole GPU comparison; ``benchmarks/RESULTS.md`` keeps the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml  # PyYAML comes with Lightning, also on the GPU machine
from lightning.pytorch import Callback, Trainer, seed_everything

from atheria_lightning.data import VALIDATION_SEED_OFFSET, EpisodeDataModule
from atheria_lightning.module import QCAModule
from atheria_lightning.physics import combined_metric

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = REPO.parent / "shared" / "bench" / "anchor_original.py"

#: The models compared. ``demo`` is configs/demo.yaml's model; ``standard`` the original notebook's recommended one
#: (the GPU presets' model); ``grid128`` the same on a 128 x 128 universe (the issue's memory target).
STANDARD = {"architecture": "UNET", "d_state": 8, "hidden_channels": 64, "grid_size": 64, "qca_steps": 100,
            "universes_per_episode": 1, "lr": 1e-4, "noise_ramp_episodes": 2000}  # fmt: skip
#: configs/demo.yaml, read once: its model and its validation settings.
DEMO = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
CONFIGS: dict[str, dict[str, Any]] = {
    "demo": DEMO["model"],
    "standard": STANDARD,
    "grid128": {**STANDARD, "grid_size": 128},
}
#: As the original's: from episode 1000 on, the noise curriculum is on in every config.
FIRST_EPISODE = 1000
SEED = 42


# --- measuring --------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: rows hold figures from microseconds to minutes."""
    return float(f"{value:.{digits}g}")


def rss_gib() -> float:
    """This process's resident memory now."""
    with contextlib.suppress(OSError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_layout(operator: torch.nn.Module) -> str:
    """The memory layout of the operator's convolution weights: channels_last, contiguous or mixed."""
    last = torch.channels_last
    layouts = {
        "channels_last" if p.is_contiguous(memory_format=last) and not p.is_contiguous() else "contiguous"
        for p in operator.parameters() if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1
    }  # fmt: skip
    return layouts.pop() if len(layouts) == 1 else "mixed"


class EpisodeClock(Callback):
    """Marks the end of every episode (wall clock and the process's CPU time); the timed stretch starts after the
    warm-up. Outside Lightning, call :meth:`mark` once before the first episode and after each one; as a callback it
    marks itself, and also times the validations inside the stretch.

    Memory: on a GPU the CUDA peak is reset where the stretch starts; on the CPU the peak RSS is the process's
    lifetime peak (getrusage cannot be reset), so memory rows run in a fresh process, warm-up included.
    """

    def __init__(self, warmup: int, device: torch.device, per_episode: bool = False) -> None:
        self.warmup, self.device, self.keep_per_episode = warmup, device, per_episode
        self.walls: list[float] = []
        self.cpus: list[float] = []
        #: (what, start, end) of validations and callback hooks, to count those inside the timed stretch.
        self.intervals: list[tuple[str, float, float]] = []
        self._validation_start = 0.0
        self.rss_at_start = rss_gib()
        #: The convolution weights' layout during the first episode (Lightning moves the module back afterwards).
        self.layout: str | None = None

    def mark(self) -> None:
        sync(self.device)
        if not self.walls:
            self.rss_at_start = rss_gib()
        self.walls.append(time.perf_counter())
        self.cpus.append(time.process_time())
        if len(self.walls) == self.warmup + 1 and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.mark()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.mark()
        if self.layout is None:
            self.layout = weights_layout(pl_module.operator)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        sync(self.device)
        self.intervals.append(("validation", self._validation_start, time.perf_counter()))

    def ms_per_episode(self) -> dict[str, float]:
        """Milliseconds per timed episode spent in each recorded interval kind (validation, each callback)."""
        start, end = self.walls[self.warmup], self.walls[-1]
        spent: dict[str, float] = defaultdict(float)
        for what, first, last in self.intervals:
            if start <= first and last <= end:
                spent[what] += last - first
        per_episode = {what: round(1000 * seconds / self.episodes, 2) for what, seconds in sorted(spent.items())}
        return {what: ms for what, ms in per_episode.items() if ms > 0}

    @property
    def episodes(self) -> int:
        return len(self.walls) - 1 - self.warmup

    def per_episode(self) -> dict[str, list[float]]:
        """Each timed episode's wall and CPU seconds, in order (a validation counts in the episode after it)."""
        first = self.warmup
        return {key: [round(b - a, 6) for a, b in zip(marks[first:-1], marks[first + 1 :], strict=True)]
                for key, marks in (("episode_s", self.walls), ("episode_cpu_s", self.cpus))}  # fmt: skip

    def fields(self) -> dict[str, Any]:
        """Seconds per timed episode (wall, CPU, wall without validation) and the peak memory."""
        episodes, first = self.episodes, self.warmup
        wall = (self.walls[-1] - self.walls[first]) / episodes
        fields = {"episodes": episodes, "s_per_episode": significant(wall),
                  "cpu_s_per_episode": significant((self.cpus[-1] - self.cpus[first]) / episodes)}  # fmt: skip
        if self.layout is not None:
            fields["weights_layout"] = self.layout
        validation_ms = self.ms_per_episode().get("validation", 0.0)  # 0 when no validation fell in the stretch
        fields["s_per_episode_without_validation"] = significant(wall - validation_ms / 1000)
        if self.keep_per_episode:
            fields.update(self.per_episode())
        return {**fields, **self.memory()}

    def memory(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3),
                    "peak_mem_kind": "cuda max_memory_allocated"}  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return {"peak_mem_gib": round(peak, 3), "peak_mem_kind": "cpu peak RSS of the process (indicative)",
                "rss_increase_gib": round(peak - self.rss_at_start, 3)}  # fmt: skip


def with_speed(row: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Adds the per-universe time and the cell-steps per second to a row holding ``s_per_episode``."""
    universes, seconds = row["universes"], row["s_per_episode"]
    row["s_per_universe_episode"] = significant(seconds / universes)
    row["mcell_steps_per_s"] = significant(universes * model["grid_size"] ** 2 * model["qca_steps"] / seconds / 1e6)
    return row


def base_row(args: argparse.Namespace, device: torch.device, variant: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        **({"label": args.label} if args.label else {}),
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": args.config, "variant": variant, "universes": model["universes_per_episode"],
        "architecture": model["architecture"], "grid": model["grid_size"], "d_state": model["d_state"],
        "hidden": model["hidden_channels"], "steps": model["qca_steps"],
    }  # fmt: skip


def error_row(args: argparse.Namespace, device: torch.device, err: BaseException, **fields: Any) -> dict[str, Any]:
    return {**({"label": args.label} if args.label else {}), "device": device_name(device),
            "command": " ".join(sys.argv[1:]), **fields, "error": f"{type(err).__name__}: {err}"[:500]}  # fmt: skip


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def model_settings(args: argparse.Namespace, universes: int | None = None) -> dict[str, Any]:
    """The config's model with the command line's overrides (``universes``: one of a list of batch sizes)."""
    model = dict(CONFIGS[args.config])
    if universes is None and args.universes:
        universes = int(args.universes.split(",")[0])
    for key, value in (("grid_size", args.grid), ("qca_steps", args.steps), ("hidden_channels", args.hidden),
                       ("d_state", args.d_state), ("universes_per_episode", universes),
                       ("architecture", args.architecture)):  # fmt: skip
        if value is not None:
            model[key] = value
    return model


# --- the original loop ------------------------------------------------------------------------------------------------


def load_anchor(path: str | Path) -> Any:
    spec = importlib.util.spec_from_file_location("anchor_original", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise FileNotFoundError(f"--anchor {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_original(
    args: argparse.Namespace, device: torch.device, model: dict[str, Any], variant: str = "original"
) -> dict[str, Any]:
    """The anchor's own ``run()`` (batch 1 for ``original``), its episodes marked by our clock on the way."""
    anchor = load_anchor(args.anchor)
    settings = argparse.Namespace(
        grid=model["grid_size"], d=model["d_state"], hidden=model["hidden_channels"], steps=model["qca_steps"],
        gamma=0.01, max_noise=0.05, episodes=args.episodes, warmup=args.warmup,
    )  # fmt: skip
    clock = EpisodeClock(args.warmup, device, args.episode_times)
    episode = anchor.episode

    def marked_episode(*episode_args: Any) -> Any:
        if not clock.walls:
            clock.mark()
        loss = episode(*episode_args)
        clock.mark()
        return loss

    anchor.episode = marked_episode  # run() looks the function up in its module at every episode
    batch = int(variant.split("x")[1]) if "x" in variant else 1
    result = anchor.run(settings, variant.split("x")[0], batch, device)
    row = base_row(args, device, variant, {**model, "universes_per_episode": batch})
    row.update(precision=anchor_precision(variant, device), **clock.fields())
    row["anchor_s_per_episode"] = result["s_per_episode"]  # its own clock, for a cross-check
    if result.get("peak_gib") is not None:
        row["peak_mem_gib"] = result["peak_gib"]  # the anchor resets the CUDA peak after its own warm-up
    return with_speed(row, model)


def anchor_precision(variant: str, device: torch.device) -> str:
    if variant == "original" and device.type == "cuda":
        return "16-mixed + GradScaler"
    return "bf16-mixed" if variant.startswith(("bf16", "sync")) else "32-true"


# --- ours -------------------------------------------------------------------------------------------------------------


def module_settings(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    """QCAModule's arguments: the model and the speed settings (checkpointing from ``--checkpoint-from-universes``)."""
    checkpointing = model["universes_per_episode"] >= args.checkpoint_from_universes
    return {**model, "checkpoint_every": args.checkpoint_every if checkpointing else 0, "compile": args.compile,
            "compile_scope": args.compile_scope, "channels_last": not args.no_channels_last}  # fmt: skip


def ours_fields(args: argparse.Namespace, module: QCAModule) -> dict[str, Any]:
    # Lightning moves the module back to the CPU after fit: read what ran on the benchmark's device.
    device_type = torch.device(args.device).type
    operators = [op for device, op in module._rollout_operators.items() if device.type == device_type]
    return {"precision": args.precision, "compile": args.compile, "compile_scope": args.compile_scope,
            "compile_active": any(getattr(op, "compiled", None) is not None for op in operators),
            "checkpoint_every": module.hparams.checkpoint_every,
            "channels_last": module.hparams.channels_last and device_type == "cuda",
            "cudnn_benchmark": torch.backends.cudnn.benchmark}  # fmt: skip


def precision_context(precision: str, device: torch.device) -> tuple[Any, Any]:
    """What Lightning's precision plugin would do: autocast, and a GradScaler for float16."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16), torch.amp.GradScaler(device.type)
    return contextlib.nullcontext(), None


def demo_validation() -> tuple[int, int]:
    """``data.val_every_episodes`` and ``data.val_universes`` of configs/demo.yaml (the datamodule's defaults where
    it sets none), so the bare loop validates as the user's run does."""
    defaults, data = EpisodeDataModule(), DEMO.get("data") or {}
    return (int(data.get("val_every_episodes", defaults.val_every_episodes)),
            int(data.get("val_universes", defaults.val_universes)))  # fmt: skip


def validate_bare(module: QCAModule, episode: int, universes: int) -> float:
    """What Lightning's validation does: each fixed validation universe through ``run_episode`` as
    ``validation_step`` runs it (its seed, episode 0, the noise of the episode reached), in eval mode under
    ``inference_mode``; ``val/combined`` averaged and read back once (Lightning's epoch-end reduction)."""
    module.eval()
    with torch.inference_mode():
        scores = []
        for index in range(universes):
            parts, _ = module.run_episode(SEED + VALIDATION_SEED_OFFSET + index, 0, module.noise_at(episode))
            scores.append(combined_metric(parts))
        combined = float(torch.stack(scores).mean())
    module.train()
    return combined


def profile_episode(train_episode: Callable[[], None], device: torch.device, top: int) -> dict[str, Any]:
    """One more episode under ``torch.profiler``: where its time goes, for the next optimisation.

    Gives the episode's wall time, the number of device kernels (or, on the CPU, of operators) and the ``top``
    entries by self time on the device (CPU: self CPU time), each with its calls and share of the total.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        train_episode()
        sync(device)
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if (e.self_device_time_total if on_gpu else e.self_cpu_time_total) > 0]

    def self_us(event: Any) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    total_us = sum(self_us(e) for e in events)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return {
        "wall_s": significant(wall), "clock": "device" if on_gpu else "cpu",
        "total_self_ms": significant(total_us / 1e3), "calls": sum(e.count for e in events),
        "top": [{"name": e.key[:120], "calls": e.count, "self_ms": significant(self_us(e) / 1e3),
                 "share": significant(self_us(e) / max(total_us, 1e-9), 3)} for e in ranked],
    }  # fmt: skip


def run_bare(
    args: argparse.Namespace, device: torch.device, model: dict[str, Any], validation: bool = False
) -> dict[str, Any]:
    """Our physics without Lightning: the same QCAModule, episode + backward + clip + AdamW in a Python loop; with
    ``validation``, also the demo config's validation at its cadence (``bare+validation``)."""
    torch.manual_seed(SEED)
    val_every, val_universes = demo_validation()
    module = QCAModule(**module_settings(args, model)).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in module.operator.parameters() if p.requires_grad]
    autocast, scaler = precision_context(args.precision, device)
    clock = EpisodeClock(args.warmup, device, args.episode_times)

    def train_episode(episode: int) -> None:
        with autocast:
            parts, _ = module.run_episode(SEED, episode, module.noise_at(episode))
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock.mark()
    last = FIRST_EPISODE + args.warmup + args.episodes
    for episode in range(FIRST_EPISODE, last):
        train_episode(episode)
        clock.mark()  # syncs once per episode, as Lightning's finite-loss check and the original's loss.item() do
        # As Lightning: after the batch-end hooks (where the clock marks), every val_every episodes of this fit.
        if validation and (episode - FIRST_EPISODE + 1) % val_every == 0:
            start = time.perf_counter()
            validate_bare(module, episode, val_universes)
            sync(device)
            clock.intervals.append(("validation", start, time.perf_counter()))
    row = base_row(args, device, "bare+validation" if validation else "bare", model)
    row.update(ours_fields(args, module), **clock.fields(), weights_layout=weights_layout(module.operator))
    if args.profile:
        row["profile"] = profile_episode(lambda: train_episode(last), device, args.profile)
    if validation:
        row.update(val_every_episodes=val_every, val_universes=val_universes,
                   validation_ms_per_episode=clock.ms_per_episode().get("validation", 0.0))  # fmt: skip
    return with_speed(row, model)


def run_lightning(args: argparse.Namespace, device: torch.device, model: dict[str, Any]) -> dict[str, Any]:
    """Our training through a plain Lightning Trainer: no logger, checkpoints, validation or progress bar."""
    seed_everything(SEED, verbose=False)
    module = QCAModule(**module_settings(args, model))
    clock = EpisodeClock(args.warmup, device, args.episode_times)
    data = EpisodeDataModule(total_episodes=FIRST_EPISODE + args.warmup + args.episodes, seed=SEED)
    data.next_episode = FIRST_EPISODE
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(
            accelerator=device.type, devices=1, precision=args.precision, gradient_clip_val=1.0, max_epochs=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock], default_root_dir=folder,
            benchmark=torch.backends.cudnn.benchmark,
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    row = base_row(args, device, "lightning", model)
    row.update(ours_fields(args, module), **clock.fields())
    return with_speed(row, model)


def run_lightning_with_callbacks(
    args: argparse.Namespace, device: torch.device, model: dict[str, Any]
) -> dict[str, Any]:
    """Our training as ``atheria fit --config configs/demo.yaml`` runs it: every callback, the logger, validation
    every ``data.val_every_episodes``, checkpoints and the mirror, the progress bar (into /dev/null)."""
    from atheria_lightning.cli import (
        AtheriaCLI,
    )  # here, not above: the CLI needs jsonargparse, GPU machines may lack it

    clock = EpisodeClock(args.warmup, device, args.episode_times)
    overrides = [f"--model.{key}={value}" for key, value in module_settings(args, model).items()]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = AtheriaCLI(
            args=["--config", str(REPO / "configs" / "demo.yaml"), "--run_root", f"{folder}/runs",
                  "--mirror_url", f"{folder}/mirror", "--resume", "never", "--trainer.accelerator", device.type,
                  "--data.total_episodes", str(FIRST_EPISODE + args.warmup + args.episodes), *overrides],
            run=False,
        )  # fmt: skip
        time_callback_hooks(cli.trainer.callbacks, clock)
        cli.trainer.callbacks.append(clock)
        cli.datamodule.next_episode = FIRST_EPISODE
        children = _children_cpu_s()
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        children = _children_cpu_s() - children  # the live plot's process, ended (and waited for) in teardown
    row = base_row(args, device, "lightning+callbacks", model)
    row.update(ours_fields(args, cli.model), **clock.fields())
    # Not in cpu_s_per_episode (this process only): the plot process's CPU over the whole fit, warm-up, start,
    # final redraw and all, per timed episode.
    row["plot_process_cpu_s_per_episode"] = significant(children / args.episodes)
    spent = clock.ms_per_episode()
    row["validation_ms_per_episode"] = spent.pop("validation", 0.0)
    row["callback_ms_per_episode"] = spent  # on_validation_* hooks run inside the validation's time
    return with_speed(row, model)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_callback_hooks(callbacks: list[Callback], clock: EpisodeClock) -> None:
    """Wraps every ``on_*`` hook each callback overrides, so the clock records how long each callback takes."""
    # Checkpoint hooks run nested inside a checkpoint callback's own hook: timing them too would count twice.
    names = [n for n in dir(Callback) if n.startswith("on_") and n not in ("on_save_checkpoint", "on_load_checkpoint")]
    for callback in callbacks:
        for name in names:
            if getattr(type(callback), name, None) is not getattr(Callback, name):
                setattr(callback, name, _timed(getattr(callback, name), f"{type(callback).__name__}.{name}", clock))


def _timed(hook: Callable[..., Any], owner: str, clock: EpisodeClock) -> Callable[..., Any]:
    def timed_hook(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            clock.intervals.append((owner, start, time.perf_counter()))

    return timed_hook


VARIANTS = {
    "bare": run_bare,
    "bare+validation": lambda *a: run_bare(*a, validation=True),
    "lightning": run_lightning,
    "lightning+callbacks": run_lightning_with_callbacks,
}


def compare(row: dict[str, Any], original: dict[str, Any] | None) -> dict[str, Any]:
    """Adds ``speed_vs_original`` (our cell-steps/s over the original's) when the original ran at these sizes."""
    if original is not None and "mcell_steps_per_s" in original and "mcell_steps_per_s" in row:
        row["original_mcell_steps_per_s"] = original["mcell_steps_per_s"]
        row["speed_vs_original"] = significant(row["mcell_steps_per_s"] / original["mcell_steps_per_s"], 3)
    return row


def find_original(path: str | None, model: dict[str, Any]) -> dict[str, Any] | None:
    """The ``original`` row at the same grid, d_state, hidden and steps in a JSON-lines file of this run."""
    if not path or not Path(path).is_file():
        return None
    keys = {"grid": model["grid_size"], "d_state": model["d_state"], "hidden": model["hidden_channels"],
            "steps": model["qca_steps"]}  # fmt: skip
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if (
                row.get("variant") == "original"
                and "error" not in row
                and all(row.get(k) == v for k, v in keys.items())
            ):
                return row
    return None


# --- commands ---------------------------------------------------------------------------------------------------------


def command_original(args: argparse.Namespace, device: torch.device) -> None:
    emit(run_original(args, device, model_settings(args), args.variant or "original"))


def command_ours(args: argparse.Namespace, device: torch.device) -> None:
    """One row per batch size in ``--universes``, in one process: the kernels compiled for one size serve the next."""
    sizes: list[int | None] = [int(n) for n in args.universes.split(",")] if args.universes else [None]
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if len(sizes) > 1 and hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4 * len(sizes)))
    for universes in sizes:
        model = model_settings(args, universes)
        try:
            row = VARIANTS[args.variant or "lightning"](args, device, model)
            emit(compare(row, find_original(args.original_from, model)))
        except Exception as err:  # out of memory at this size, say: write it down and try the next
            emit(error_row(args, device, err, universes=model["universes_per_episode"]))
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def command_cpu(args: argparse.Namespace, device: torch.device) -> None:
    """The issue's CPU rows: target 4 on the demo config, then grid 128 with and without checkpointing."""
    demo_rounds(args, device)
    if args.demo_only:
        return
    short = ["--config", "grid128", "--steps", str(args.grid128_steps), "--episodes", "1", "--warmup", "1"]
    emit(subprocess_row(args, "original", *short))
    for every in (0, args.grid128_checkpoint_every):
        emit(subprocess_row(args, "ours", *short, "--variant", "bare", "--checkpoint-every", str(every)))
    if args.grid128_full:  # the real 100 steps, checkpointed (without, it would need about 18 GiB here)
        full = ["--config", "grid128", "--episodes", "1", "--warmup", "0", "--variant", "bare"]
        emit(subprocess_row(args, "ours", *full, "--checkpoint-every", "10"))


def demo_rounds(args: argparse.Namespace, device: torch.device) -> None:
    """Target 4. Rounds interleave the variants, so a busy machine slows them alike; ratios are taken within rounds."""
    args.config, args.episode_times = "demo", True
    model = model_settings(args)
    one = {**model, "universes_per_episode": 1}
    runs = {
        "original": lambda: run_original(args, device, one),
        "original without gc (anchor fp32)": lambda: run_original(args, device, one, "fp32"),
        "bare": lambda: run_bare(args, device, model),
        "bare+validation": lambda: run_bare(args, device, model, validation=True),
        "lightning": lambda: run_lightning(args, device, model),
        "lightning+callbacks": lambda: run_lightning_with_callbacks(args, device, model),
        "bare, 1 universe": lambda: run_bare(args, device, one),
        "bare+validation, 1 universe": lambda: run_bare(args, device, one, validation=True),
        "lightning+callbacks, 1 universe": lambda: run_lightning_with_callbacks(args, device, one),
    }
    if args.only:
        unknown = [name for name in args.only if name not in runs]
        if unknown:
            raise SystemExit(f"--only {unknown[0]!r}: not a variant; accepted: {'; '.join(runs)}")
        runs = {name: run for name, run in runs.items() if name in args.only}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            row = run()
            rows[name].append(row)
            print(f"round {round_index} {name}: {row['s_per_universe_episode']:.4f} s, "
                  f"{row['cpu_s_per_episode'] / row['universes']:.4f} CPU s per universe-episode",
                  file=sys.stderr, flush=True)  # fmt: skip
    summary = {name: {**median_row(found), "name": name} for name, found in rows.items()}
    for name, row in summary.items():
        emit(compare(row, summary["original"]) if "original" in summary and not name.startswith("original") else row)
    emit(targets(rows, next(iter(summary.values()))["device"]))


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    row = {key: value for key, value in rows[0].items() if key not in ("episode_s", "episode_cpu_s")}
    for key in ("s_per_episode", "cpu_s_per_episode", "s_per_episode_without_validation", "validation_ms_per_episode",
                "s_per_universe_episode", "mcell_steps_per_s", "plot_process_cpu_s_per_episode"):  # fmt: skip
        if key in row:
            row[key] = significant(statistics.median(r[key] for r in rows))
    if "callback_ms_per_episode" in row:
        row["callback_ms_per_episode"] = {
            name: round(statistics.median(r["callback_ms_per_episode"].get(name, 0.0) for r in rows), 2)
            for name in row["callback_ms_per_episode"]
        }
    row["rounds"] = len(rows)
    row["per_round_s_per_universe_episode"] = [r["s_per_universe_episode"] for r in rows]
    return row


def targets(rows: dict[str, list[dict[str, Any]]], device: str) -> dict[str, Any]:
    """Target 4: Lightning with callbacks >= 1.0x the original's speed and <= 1.05x the bare loop's time.

    ``time_vs_bare`` compares like with like: the bare loop doing the same validation (``bare+validation``).
    ``time_vs_bare_without_validation`` is the older figure against the bare loop that skips validation (the
    Lightning run does work that loop does not); ``time_vs_bare_both_without_validation_wall`` removes the
    validation time from both sides.

    Per universe-episode (the demo rolls 2 universes per episode, the original 1), by wall clock and by CPU time (the
    steadier figure on a shared machine); each ratio is the median of the per-round ratios.
    """

    def per_round(slow: str, fast: str, key: str = "s_per_episode") -> list[float]:
        return [
            a[key] / a["universes"] / (b[key] / b["universes"]) for a, b in zip(rows[slow], rows[fast], strict=True)
        ]

    def ratio(slow: str, fast: str, key: str = "s_per_episode") -> float:
        return round(statistics.median(per_round(slow, fast, key)), 3)

    pairs = {
        "speed_vs_original": ("original", "lightning+callbacks"),
        "speed_vs_original_without_gc": ("original without gc (anchor fp32)", "lightning+callbacks"),
        "speed_vs_original_1_universe": ("original", "lightning+callbacks, 1 universe"),
        "time_vs_bare": ("lightning+callbacks", "bare+validation"),
        "time_vs_bare_1_universe": ("lightning+callbacks, 1 universe", "bare+validation, 1 universe"),
        "time_vs_bare_without_validation": ("lightning+callbacks", "bare"),
        "time_vs_bare_without_validation_1_universe": ("lightning+callbacks, 1 universe", "bare, 1 universe"),
        "time_of_plain_lightning_vs_bare": ("lightning", "bare"),
    }
    rounds = len(next(iter(rows.values())))
    verdict: dict[str, Any] = {"device": device, "config": "demo", "summary": "target 4", "rounds": rounds}
    for name, (slow, fast) in pairs.items():
        if slow in rows and fast in rows:
            verdict[name] = {"wall": ratio(slow, fast), "cpu": ratio(slow, fast, "cpu_s_per_episode")}
    if "lightning+callbacks" in rows and "bare+validation" in rows:
        ours, bare = rows["lightning+callbacks"], rows["bare+validation"]
        # Each round's ratio, to see the spread. (A bootstrap interval of their median was tried and understated
        # the spread between runs: the machine's load drifts over minutes, so rounds are not independent.)
        for clock, key in (("wall", "s_per_episode"), ("cpu", "cpu_s_per_episode")):
            found = per_round("lightning+callbacks", "bare+validation", key)
            verdict["time_vs_bare"][f"{clock}_per_round"] = [round(value, 4) for value in found]
        both = [a["s_per_episode_without_validation"] / b["s_per_episode_without_validation"]
                for a, b in zip(ours, bare, strict=True)]  # fmt: skip
        verdict["time_vs_bare_both_without_validation_wall"] = round(statistics.median(both), 3)
        verdict["time_vs_bare_min_per_episode"] = {
            clock: round(least_time(ours, key) / least_time(bare, key), 3)
            for clock, key in (("wall", "episode_s"), ("cpu", "episode_cpu_s"))
        }
    if "lightning+callbacks" in rows and "bare" in rows:
        without_validation = [a["s_per_episode_without_validation"] / b["s_per_episode"]
                              for a, b in zip(rows["lightning+callbacks"], rows["bare"], strict=True)]  # fmt: skip
        verdict["time_without_validation_vs_bare_wall"] = round(statistics.median(without_validation), 3)
    verdict["targets"] = {"speed_vs_original": ">= 1.0", "time_vs_bare": "<= 1.05"}
    return verdict


def least_time(rows: list[dict[str, Any]], key: str = "episode_s") -> float:
    """Seconds per episode with the machine's noise filtered out: each episode's least time over the rounds, averaged.

    The rounds repeat the same episodes (same seeds, same validations and saves at the same episode numbers), so
    another program's work only ever adds time to an episode; the least of the rounds is the episode's own cost.
    Periodic costs (validation every 10 episodes, checkpoint saves) fall on the same episodes in every round and stay
    in. On a shared machine this is steadier than the median of per-round ratios, which it complements.
    """
    episodes = min(len(row[key]) for row in rows)
    return sum(min(row[key][index] for row in rows) for index in range(episodes)) / episodes


def subprocess_row(args: argparse.Namespace, command: str, *extra: str) -> dict[str, Any]:
    """One row in a fresh process, so the CPU peak RSS is that row's own."""
    cli = [sys.executable, __file__, command, "--anchor", str(args.anchor), "--threads", str(args.threads), *extra]
    print(f"running {' '.join(cli[1:])}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"command": " ".join(cli[1:]), "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=("cpu", "ours", "original"))
    parser.add_argument("--config", choices=tuple(CONFIGS), default="standard")
    parser.add_argument("--variant", default=None, help=f"ours: {', '.join(VARIANTS)}; original: the anchor's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--episodes", type=int, default=10, help="timed episodes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed episodes first (compilation, CUDA graphs)")
    parser.add_argument("--universes", default=None, help="universes per episode, or a list: 16,32,64 (ours)")
    parser.add_argument("--architecture", default=None, help="ours: another operator (the original is a U-Net)")
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--d-state", type=int, default=None)
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--compile", default="off", help="model.compile")
    parser.add_argument("--compile-scope", default="operator", help="model.compile_scope: operator or step")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="model.checkpoint_every")
    parser.add_argument("--checkpoint-from-universes", type=int, default=0, help="checkpoint only from this batch on")
    parser.add_argument("--no-channels-last", action="store_true", help="model.channels_last=false")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="bare: profile an episode, top N")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--anchor", default=str(DEFAULT_ANCHOR), help="the original loop's re-implementation")
    parser.add_argument("--original-from", default=None, help="JSON lines holding this run's `original` rows")
    parser.add_argument("--label", default="", help="a name for the row, copied into it")
    parser.add_argument("--episode-times", action="store_true", help="rows also list each timed episode's seconds")
    parser.add_argument("--rounds", type=int, default=5, help="cpu: interleaved rounds of the demo comparison")
    parser.add_argument("--only", action="append", metavar="VARIANT", help="cpu: only this demo variant (repeatable)")
    parser.add_argument("--demo-only", action="store_true", help="cpu: the demo comparison alone, no grid-128 rows")
    parser.add_argument("--grid128-steps", type=int, default=10, help="cpu: steps of the short grid-128 rows")
    parser.add_argument("--grid128-checkpoint-every", type=int, default=3, help="cpu: the short row's checkpoint_every")
    parser.add_argument("--grid128-full", action="store_true", help="cpu: also 100 steps with checkpoint_every 10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.episodes < 1 or args.warmup < 0:
        raise SystemExit("--episodes must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    commands = {"cpu": command_cpu, "ours": command_ours, "original": command_original}
    try:
        commands[args.command](args, device)
    except Exception as err:  # one JSON line saying what failed, so a suite of rows carries on
        emit(error_row(args, device, err))
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
