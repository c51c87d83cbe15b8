"""TorchScript export of a trained Law M operator, its loading, and a small inference rollout."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from atheria_lightning.errors import ConfigError, OneLineArgumentParser
from atheria_lightning.files import atomic_write
from atheria_lightning.physics import initial_state, lindblad_step, psi_magnitude

if TYPE_CHECKING:
    from atheria_lightning.store import RunStore

log = logging.getLogger(__name__)

__all__ = [
    "METADATA_FILE",
    "export_best",
    "export_checkpoint",
    "load",
    "load_metadata",
    "main",
    "psi_magnitude",
    "rollout_scripted",
    "save_psi_image",
]

#: Name of the JSON metadata embedded in the TorchScript archive (``torch.jit.load(..., _extra_files=...)``).
METADATA_FILE = "atheria.json"
METADATA_VERSION = 1
# The checkpoint's hyper-parameters that say how to run the operator; all of them go into the metadata.
HPARAM_KEYS = ("architecture", "d_state", "hidden_channels", "grid_size", "gamma_decay", "qca_steps")
# Longest underlying error text quoted in a one-line ConfigError.
MAX_REASON_CHARS = 200
#: The file ``export_best`` writes in the run's ``exports/``.
MODEL_FILE = "model.ts"
# Bounded wait for the queued checkpoint writes before choosing the best: a dying session must not hang on it.
CHECKPOINT_WAIT_S = 120.0


def export_checkpoint(ckpt_path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the operator of a ``QCAModule`` checkpoint as TorchScript at ``output``; returns its path.

    The operator is rebuilt from the checkpoint alone (``weights_only=True``: it may come from a shared Drive),
    scripted with ``torch.jit.script`` (``torch.jit.trace`` when scripting fails; the metadata says which), and
    saved with its settings as ``atheria.json`` inside the archive. The file appears complete or not at all.

    The exported module maps ``cat(real, imag)`` of shape ``(B, 2d, H, W)`` to the delta of the same shape;
    a recurrent operator (``UNET_CONVLSTM``) takes and returns its memory: ``forward(x, memory) -> (out, memory)``.

    Raises:
        ConfigError: ``ckpt_path`` is missing, is not a checkpoint, or its operator cannot be rebuilt.
    """
    ckpt_path, output = Path(ckpt_path), Path(output)
    if output.is_dir():
        raise ConfigError(f"--output={str(output)!r} is a folder; give a file name such as model.ts")
    operator, metadata = _rebuild_operator(ckpt_path)
    exported, metadata["export_method"] = _to_torchscript(operator, metadata)
    extra_files = {METADATA_FILE: json.dumps(metadata, indent=1, sort_keys=True)}
    atomic_write(LocalFileSystem(), str(output), lambda handle: torch.jit.save(exported, handle, extra_files))
    return output


def export_best(
    store: RunStore, exports_dir: str | os.PathLike, wait_s: float = CHECKPOINT_WAIT_S
) -> dict[str, Any] | None:
    """Export the checkpoint the run's store calls best to ``<exports_dir>/model.ts``, after training.

    The best is :meth:`RunStore.best`'s choice: the lowest finite metric among the kept best files, else the newest
    checkpoint, never one with non-finite weights. It is chosen once the queued checkpoint writes are done (or
    ``wait_s`` passed). Call it on global rank 0, before the store's final flush, so that the mirror gets the file.

    Returns:
        What ``training_log.json`` records of the export (``exported_model``; hand it to
        :func:`atheria_lightning.report.write_report`): ``file``, ``from_checkpoint``, ``episode``, ``metric`` and
        ``method`` (``script`` or ``trace``). None, after a warning, when the run has no sound checkpoint or its
        operator cannot be exported: a failed export never fails a finished training.
    """
    if not store.wait(timeout=wait_s):
        log.warning("checkpoint writes still pending after %.0f s: exporting the best listed so far", wait_s)
    chosen = store.best()
    if chosen is None:
        log.warning("no sound checkpoint in %s: %s not exported", store.checkpoint_dir, MODEL_FILE)
        return None
    try:
        output = export_checkpoint(chosen.path, os.path.join(exports_dir, MODEL_FILE))
    except ConfigError as err:
        log.warning("%s not exported: %s", MODEL_FILE, err)
        return None
    metric = chosen.metric if chosen.metric is not None and math.isfinite(chosen.metric) else None
    monitor = store.monitor or "the monitored metric"
    kinds = {name: entry.kind for name, entry in store.entries().items()}
    if metric is not None and kinds.get(chosen.name) == "best":
        kept = sum(kind == "best" for kind in kinds.values())
        reason = f"the lowest {monitor} ({metric:.4g}) of the {kept} best checkpoint(s) kept"
    else:
        reason = f"no kept checkpoint has a finite {monitor}: the newest sound checkpoint"
    return {
        "file": output.name,
        "from_checkpoint": chosen.name,
        "episode": chosen.episode,
        "metric": metric,
        "monitor": store.monitor,
        "reason": reason,
        "method": load_metadata(output)["export_method"],
    }


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The exported operator, in eval mode; no ``atheria_lightning`` model code is needed to run it."""
    return torch.jit.load(str(path), map_location=map_location).eval()


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The settings embedded by :func:`export_checkpoint`: architecture, sizes, ``gamma_decay``, flags, method."""
    extra_files = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    return json.loads(extra_files[METADATA_FILE])


class _ExportedOperator(nn.Module):
    """Gives an exported operator the class flags that :func:`lindblad_step` reads, so inference steps as training."""

    def __init__(self, module: nn.Module, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.multiplicative = bool(metadata["multiplicative"])
        self.recurrent = bool(metadata["recurrent"])

    def forward(self, x: torch.Tensor, *memory: Any) -> Any:
        return self.module(x, *memory)


@torch.no_grad()
def rollout_scripted(
    model: nn.Module,
    metadata: dict[str, Any],
    steps: int = 100,
    grid_size: int | None = None,
    seed: int = 0,
    universes: int = 1,
    kind: str = "random",
) -> torch.Tensor:
    """Evolve a fresh universe for ``steps`` Lindblad-Euler steps with an exported operator, without noise.

    ``psi' = normalize(psi + A(psi) - gamma * psi)`` with the checkpoint's ``gamma_decay``; the step is the
    training engine's own (:func:`atheria_lightning.physics.lindblad_step`), only the operator is TorchScript.

    Args:
        model: From :func:`load` (or any operator with the same call signature).
        metadata: From :func:`load_metadata`.
        steps: Steps to roll forward.
        grid_size: Side of the universe; the training grid by default (U-Nets need a multiple of 4).
        seed: Seeds the initial "primordial soup".
        universes: Universes evolved together (the batch).
        kind: The initial state, as ``model.initial_state``: ``random``, ``complex_noise`` or ``zeros``.

    Returns:
        The final state, complex64 ``(universes, H, W, d_state)``.
    """
    operator = _ExportedOperator(model, metadata)
    grid = int(grid_size or metadata["grid_size"])
    generator = torch.Generator().manual_seed(seed)
    psi = initial_state(kind, universes, grid, int(metadata["d_state"]), generator)  # (B, H, W, d)
    memory = _initial_memory(metadata, universes, grid)
    for _ in range(steps):
        psi, memory = lindblad_step(operator, psi, float(metadata["gamma_decay"]), memory)
    return psi


def save_psi_image(psi: torch.Tensor, path: str | os.PathLike, title: str = "sum_d |psi|") -> Path:
    """Save :func:`psi_magnitude` of ``psi`` as a PNG with a colour bar (matplotlib, Agg, no window)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(psi_magnitude(psi).cpu().numpy(), cmap="magma")
    figure.colorbar(image, ax=axes)
    axes.set_title(title)
    axes.set_axis_off()
    path = Path(path)
    atomic_write(LocalFileSystem(), str(path), lambda handle: figure.savefig(handle, format="png", dpi=100))
    return path


def main(argv: list[str] | None = None) -> int:
    """``atheria export --ckpt_path X --output model.ts``: bad input prints one line and returns 2."""
    parser = OneLineArgumentParser(
        prog="atheria export", description="Write the operator of a checkpoint as TorchScript for inference."
    )
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint of atheria fit (e.g. best-e000040.ckpt).")
    parser.add_argument("--output", default="model.ts", help="The TorchScript file to write (default: model.ts).")
    try:
        args = parser.parse_args(argv)
        written = export_checkpoint(args.ckpt_path, args.output)
    except ConfigError as err:
        print(f"atheria: error: {err}", file=sys.stderr)
        return 2
    metadata = load_metadata(written)
    print(f"exported {metadata['architecture']} ({metadata['export_method']}) from {args.ckpt_path} to {written}")
    return 0


# ----- helpers -----
def _rebuild_operator(ckpt_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's operator on the CPU in eval mode, and the metadata that describes it."""
    from atheria_lightning.module import QCAModule  # Lightning is only needed here, not to run an export

    checkpoint = _read_checkpoint(ckpt_path)
    try:
        module = QCAModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except ConfigError as err:
        raise ConfigError(f"--ckpt_path={str(ckpt_path)!r}: the operator cannot be rebuilt: {err}") from None
    except Exception as err:  # a shape mismatch, a missing tensor: anything here means "not this model"
        raise ConfigError(
            f"--ckpt_path={str(ckpt_path)!r}: the operator cannot be rebuilt from it ({_one_line(err)})"
        ) from None
    operator = module.operator.eval()
    if not all(torch.isfinite(tensor).all() for tensor in operator.state_dict().values() if tensor.is_floating_point()):
        raise ConfigError(
            f"--ckpt_path={str(ckpt_path)!r} holds non-finite weights (a diverged run): export an earlier checkpoint"
        )
    hparams = dict(module.hparams)
    metadata: dict[str, Any] = {key: hparams[key] for key in HPARAM_KEYS if key in hparams}
    metadata.update(
        format_version=METADATA_VERSION,
        recurrent=bool(getattr(operator, "recurrent", False)),
        multiplicative=bool(getattr(operator, "multiplicative", False)),
        grid_multiple=int(getattr(operator, "grid_multiple", 1)),
        episode=_episode_of(checkpoint),
        source_checkpoint=ckpt_path.name,
        torch_version=torch.__version__,
        input="(B, 2*d_state, H, W) float32: cat(real, imag) of psi",
        output="(B, 2*d_state, H, W): the complex delta as cat(real, imag)",
    )
    return operator, metadata


def _read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    """The checkpoint dict (tensors memory-mapped, not read), after checking it is a ``QCAModule`` checkpoint."""
    if not ckpt_path.is_file():
        raise ConfigError(f"--ckpt_path={str(ckpt_path)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(ckpt_path):  # torch.save has written zip archives since torch 1.6
        raise ConfigError(f"--ckpt_path={str(ckpt_path)!r} is not a checkpoint (not a torch.save archive)")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(
            f"--ckpt_path={str(ckpt_path)!r} does not load as a safe checkpoint (weights_only=True): {_one_line(err)}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"--ckpt_path={str(ckpt_path)!r} is not a Lightning checkpoint (no state_dict in it)")
    if "architecture" not in (checkpoint.get("hyper_parameters") or {}):
        raise ConfigError(
            f"--ckpt_path={str(ckpt_path)!r}: the operator cannot be rebuilt (no model.architecture in its "
            "hyper-parameters; was it written by atheria fit?)"
        )
    return checkpoint


def _episode_of(checkpoint: dict[str, Any]) -> int | None:
    from atheria_lightning.store import META_KEY

    episode = (checkpoint.get(META_KEY) or {}).get("episode")
    return None if episode is None else int(episode)


def _to_torchscript(operator: nn.Module, metadata: dict[str, Any]) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.script`` keeps control flow (the optional memory); tracing is the fallback for exotic operators."""
    try:
        return torch.jit.script(operator), "script"
    except Exception as err:
        log.warning("torch.jit.script failed (%s); tracing the operator instead", _one_line(err))
    grid = int(metadata["grid_size"])
    x = torch.zeros(1, 2 * int(metadata["d_state"]), grid, grid)  # (B, 2d, H, W)
    example = (x, _initial_memory(metadata, 1, grid)) if metadata["recurrent"] else (x,)
    try:
        with torch.no_grad():
            return torch.jit.trace(operator, example), "trace"
    except Exception as err:
        raise ConfigError(f"the {metadata.get('architecture')} operator cannot be exported: {_one_line(err)}") from None


def _initial_memory(metadata: dict[str, Any], universes: int, grid: int) -> Any:
    """An empty recurrent memory: ``None`` for a scripted operator, explicit zeros for a traced one.

    Zeros equal the ConvLSTM's own empty state (its hidden and cell start at zero), at its bottleneck: 8h channels,
    a quarter of the grid.
    """
    if not metadata.get("recurrent") or metadata.get("export_method", "trace") == "script":
        return None
    shape = (universes, 8 * int(metadata["hidden_channels"]), grid // 4, grid // 4)
    return torch.zeros(shape), torch.zeros(shape)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
