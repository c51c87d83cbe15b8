"""``atheria report RUN``: a run's summary.png and report.md, drawn from its exports/training_log.json alone."""

from __future__ import annotations

import json
import sys
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from atheria_lightning.errors import ConfigError, OneLineArgumentParser
from atheria_lightning.figures import EPISODE_KEYS, VALIDATION_KEYS, png_bytes, summary_figure
from atheria_lightning.files import atomic_write, join
from atheria_lightning.untrusted import (
    ANY,
    MIB,
    NUMBER,
    TEXT,
    WHOLE,
    UntrustedFileError,
    check,
    info_of,
    list_of,
    load_json,
    mapping,
    optional,
    read_bounded,
)

__all__ = [
    "FILE_NOTES",
    "check_training_log",
    "main",
    "parse_training_log",
    "read_training_log",
    "report_markdown",
    "write_report",
]

#: The run folder's subfolder of exports, and the log in it that the report is drawn from.
EXPORTS = "exports"
LOG_FILE = "training_log.json"
#: The files of ``exports/`` that the report lists, with what each holds (only those present are listed).
FILE_NOTES = {
    "live_loss.png": "loss so far, redrawn every plot_every_n_episodes episodes",
    "summary.png": "loss, survival, checkpoint timeline, loss distribution",
    "training_log.json": "every episode's metrics over all sessions, validations, checkpoints, config, time",
    "report.md": "this report",
    "model.ts": "TorchScript of the best operator: atheria_lightning.export.load()",
}


#: What :func:`write_report` writes.
WRITTEN = ("summary.png", "report.md")
#: A log of 400 000 episodes is 63 MB; one over four times that is no log a run wrote, and is refused unread: the
#: bound on what a read (and the JSON it parses into) takes in memory.
MAX_LOG_BYTES = 256 * MIB

_METRIC = optional(NUMBER)
#: What the report and summary.png read of ``training_log.json``, as TrainingLog writes it (null where a value was
#: not finite); other keys are left alone. Lists drawn item by item are bounded (more checkpoints than any top_k,
#: more sessions than years of them): each costs the drawing time. The settings in ``config`` may be of any kind,
#: written out as text: only their nesting is bounded.
TRAINING_LOG = mapping({
    "experiment": optional(TEXT), "run_dir": optional(TEXT), "phase": optional(TEXT), "written_at": optional(TEXT),
    "monitor": optional(TEXT), "episodes_done": WHOLE, "total_episodes": optional(WHOLE),
    "config": mapping({part: optional(mapping({}, others=ANY)) for part in ("model", "data", "trainer")}),
    "time": mapping({"sessions": WHOLE, "total_training_hours": NUMBER, "episodes_per_second": _METRIC}),
    # last_episode is first_episode - 1 in a session that ran no episode: -1 for the first.
    "sessions": list_of(mapping({"session": WHOLE, "first_episode": WHOLE, "last_episode": NUMBER, "episodes": WHOLE,
                                 "training_seconds": NUMBER}, required=True), most=10_000),
    "best": mapping({**{key: _METRIC for key in ("val_loss", "val_combined", "train_loss", "last_train_loss",
                                                  "last_train_survival")},
                     **{key: optional(WHOLE) for key in ("val_loss_episode", "val_combined_episode",
                                                         "train_loss_episode", "last_episode")}}),
    "checkpoints": list_of(mapping({"file": TEXT, "kind": TEXT, "episode": WHOLE, "metric": _METRIC, "size": WHOLE},
                                   required=("file", "kind", "episode", "size")), most=1_000),
    "saved_episodes": list_of(WHOLE),
    "exported_model": optional(mapping({"file": TEXT, "from_checkpoint": TEXT, "episode": WHOLE, "method": TEXT,
                                        "metric": _METRIC, "monitor": optional(TEXT), "reason": optional(TEXT)},
                                       required=("file", "from_checkpoint", "episode", "method"))),
    "episodes": list_of(mapping({"episode": WHOLE, **{key: _METRIC for key in EPISODE_KEYS}}, required=("episode",))),
    "validations": list_of(mapping({"episode": WHOLE, **{key: _METRIC for key in VALIDATION_KEYS}},
                                   required=("episode",))),
})  # fmt: skip


def read_training_log(run_dir: str) -> dict[str, Any]:
    """``<run_dir>/exports/training_log.json`` as a dict; ``run_dir`` is a folder or an fsspec URL.

    Raises:
        ConfigError: The file is missing, unreadable, or not a training log.
    """
    try:
        fs, root = url_to_fs(run_dir)
    except Exception as err:  # an unknown protocol, a missing package: each backend has its own
        raise ConfigError(f"RUN_DIR={run_dir!r} cannot be opened: {' '.join(str(err).split())}") from None
    try:
        training_log = parse_training_log(read_bounded(fs, root, f"{EXPORTS}/{LOG_FILE}", MAX_LOG_BYTES))
        check_training_log(training_log)
    except FileNotFoundError:
        raise ConfigError(
            f"RUN_DIR={run_dir!r} has no {EXPORTS}/{LOG_FILE}: give a run folder (<run_root>/<experiment_name>) or "
            "its mirror copy, after a fit with TrainingLog (every preset lists it)"
        ) from None
    except ValueError as err:  # UntrustedFileError: not a file, too large, not JSON, a wrong value
        raise ConfigError(f"RUN_DIR={run_dir!r}: {EXPORTS}/{LOG_FILE} {err}") from None
    return training_log


def parse_training_log(data: bytes | str) -> dict[str, Any]:
    """A training log from the bytes of ``training_log.json`` (untrusted: only its outline is checked here, the
    rest by :func:`check_training_log`).

    Raises:
        UntrustedFileError: Not JSON (nested too deep included), or not a training log; the message completes
            "training_log.json …". It is a ValueError.
    """
    training_log = load_json(data)
    if not isinstance(training_log, dict) or not isinstance(training_log.get("episodes"), list):
        raise UntrustedFileError("is not a training log (no list of episodes)")
    return training_log


def check_training_log(training_log: dict[str, Any]) -> None:
    """Raise unless every value the report reads of ``training_log`` has the type and range TrainingLog writes.

    Raises:
        UntrustedFileError: The first wrong value, named by its place (``episodes[6].loss``); the message completes
            "training_log.json …".
    """
    check(training_log, TRAINING_LOG)


def write_report(run_dir: str, exported_model: dict[str, Any] | None = None, output_dir: str | None = None) -> str:
    """Draw ``summary.png`` and write ``report.md`` from the run's ``training_log.json``; returns report.md's path.

    Args:
        run_dir: The run folder or its copy on the mirror: a folder or an fsspec URL.
        exported_model: What :func:`atheria_lightning.export.export_best` returned after training; when given, it
            is recorded in ``training_log.json`` first (as ``exported_model``), so that a later redraw shows it too.
        output_dir: Where the two files go; ``<run_dir>/exports`` by default.

    Raises:
        ConfigError: ``training_log.json`` is missing or unreadable, or a file cannot be written.
    """
    training_log = read_training_log(run_dir)
    fs, root = url_to_fs(run_dir)
    exports = join(root, EXPORTS)
    if exported_model is not None:
        training_log["exported_model"] = exported_model
        _write(fs, join(exports, LOG_FILE), json.dumps(training_log, indent=1).encode(), f"RUN_DIR={run_dir!r}")
    files = [name for name in FILE_NOTES if name in WRITTEN or _exists(fs, root, f"{EXPORTS}/{name}")]
    summary = png_bytes(summary_figure(training_log))
    text = report_markdown(training_log, files)
    if output_dir is None:
        out_fs, out_root, setting = fs, exports, f"RUN_DIR={run_dir!r}"
    else:
        (out_fs, out_root), setting = url_to_fs(output_dir), f"--output={output_dir!r}"
    _write(out_fs, join(out_root, "summary.png"), summary, setting)
    _write(out_fs, join(out_root, "report.md"), text.encode(), setting)
    report = join(out_root, "report.md")
    return report if isinstance(out_fs, LocalFileSystem) else out_fs.unstrip_protocol(report)


def _exists(fs: AbstractFileSystem, root: str, name: str) -> bool:
    try:
        return info_of(fs, root, name)["type"] == "file"  # a link is not followed, nor listed
    except Exception:  # missing or unreadable: not listed
        return False


def _write(fs: AbstractFileSystem, path: str, data: bytes, setting: str) -> None:
    """``data`` as the whole file ``path``, atomically; a failed write is a one-line error naming ``setting``."""
    try:
        atomic_write(fs, path, lambda handle: handle.write(data))
    except OSError as err:
        raise ConfigError(f"{setting}: cannot write {path}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """``atheria report RUN_DIR [--output FOLDER]``: a missing or unreadable log prints one line and returns 2."""
    parser = OneLineArgumentParser(
        prog="atheria report",
        description="Draw summary.png and report.md of a run from its exports/training_log.json, e.g. from the "
        "mirror after the session that trained it has gone.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="A run folder (<run_root>/<experiment_name>), its mirror copy, or a URL."
    )
    parser.add_argument(
        "--output", default=None, help="Folder for summary.png and report.md (default: RUN_DIR/exports)."
    )
    try:
        args = parser.parse_args(argv)
        written = write_report(args.run_dir, output_dir=args.output)
    except ConfigError as err:
        print(f"atheria: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {written} (summary.png beside it)")
    return 0


def report_markdown(training_log: dict[str, Any], files: list[str]) -> str:
    """``report.md``: progress, time, best metrics, checkpoints, config and files of a ``training_log`` dict."""
    lines = [f"# Atheria training report: {training_log.get('experiment')}", ""]
    if training_log.get("phase"):
        lines += [f"Phase: **{training_log['phase']}**", ""]
    lines += [f"Written {training_log.get('written_at')} in `{training_log.get('run_dir')}`.", ""]
    lines += _progress_section(training_log) + _best_section(training_log) + _checkpoint_section(training_log)
    lines += _config_section(training_log.get("config", {}))
    lines += ["## Files", "", "| file | what |", "|---|---|"]
    lines += [f"| `exports/{name}` | {FILE_NOTES.get(name, '')} |" for name in files]
    lines += [f"| `checkpoints/` | last.ckpt, best-eNNNNNN.ckpt (top-k by {_monitor(training_log)}), MANIFEST.json |",
              "| `logs/` | TensorBoard events of every session (`tensorboard --logdir` the run root), or W&B's "
              "files in `logs/wandb/` with the run's id in `logs/wandb_run.json`; config.yaml |",
              ""]  # fmt: skip
    return "\n".join(lines)


def _progress_section(training_log: dict[str, Any]) -> list[str]:
    done, total = training_log.get("episodes_done", 0), training_log.get("total_episodes")
    share = f" ({100.0 * done / total:.0f}%)" if total else ""
    time_used = training_log.get("time", {})
    speed = time_used.get("episodes_per_second")
    lines = ["## Progress", "", "| | |", "|---|---|",
             f"| episodes | {done}" + (f" of {total}" if total else "") + f"{share} |",
             f"| sessions | {time_used.get('sessions', 0)} |",
             f"| training time | {time_used.get('total_training_hours', 0.0):.3f} h |",
             f"| episodes per second | {_fmt(speed, '.3f')} (over all sessions) |", "",
             "| session | episodes | first - last | training time | episodes/s |", "|---|---|---|---|---|"]  # fmt: skip
    for session in training_log.get("sessions", []):
        seconds, count = session["training_seconds"], session["episodes"]
        rate = _fmt(count / seconds if seconds else None, ".3f")
        lines.append(f"| {session['session']} | {count} | {session['first_episode']} - {session['last_episode']} "
                     f"| {seconds / 3600.0:.3f} h ({seconds:.1f} s) | {rate} |")  # fmt: skip
    return lines + [""]


def _best_section(training_log: dict[str, Any]) -> list[str]:
    best = training_log.get("best", {})
    monitor = _monitor(training_log)
    lines = ["## Best metrics", "",
             f"Checkpoints are ranked by `{monitor}` (lower is better): the best ones kept, and the exported model, "
             "are those with its lowest values.", "",
             "| | value | episode |", "|---|---|---|",
             f"| best val/loss (the training objective on the validation universes) | {_fmt(best.get('val_loss'))} "
             f"| {_fmt(best.get('val_loss_episode'), 'd')} |",
             f"| best val/combined (the original's score; lower is better) | {_fmt(best.get('val_combined'))} "
             f"| {_fmt(best.get('val_combined_episode'), 'd')} |",
             f"| lowest train/loss | {_fmt(best.get('train_loss'))} | {_fmt(best.get('train_loss_episode'), 'd')} |",
             f"| last train/loss | {_fmt(best.get('last_train_loss'))} | {_fmt(best.get('last_episode'), 'd')} |",
             f"| last train/survival | {_fmt(best.get('last_train_survival'))} "
             f"| {_fmt(best.get('last_episode'), 'd')} |"]  # fmt: skip
    exported = training_log.get("exported_model")
    if exported:
        lines.append(f"| exported model `exports/{exported['file']}` | from {exported['from_checkpoint']} "
                     f"({exported.get('monitor') or monitor} {_fmt(exported.get('metric'))}, "
                     f"torch.jit.{exported['method']}) | {exported['episode']} |")  # fmt: skip
        if exported.get("reason"):
            lines += ["", f"The exported model is {exported['from_checkpoint']} (episode {exported['episode']}): "
                          f"{exported['reason']}."]  # fmt: skip
    return lines + [""]


def _checkpoint_section(training_log: dict[str, Any]) -> list[str]:
    lines = ["## Checkpoints (MANIFEST.json)", "", f"| file | kind | episode | {_monitor(training_log)} | size |",
             "|---|---|---|---|---|"]  # fmt: skip
    for entry in training_log.get("checkpoints", []):
        lines.append(f"| {entry['file']} | {entry['kind']} | {entry['episode']} | {_fmt(entry.get('metric'))} "
                     f"| {entry['size'] / 1e6:.2f} MB |")  # fmt: skip
    return lines + [""]


def _config_section(config: dict[str, Any]) -> list[str]:
    lines = ["## Config", ""]
    for part in ("model", "data", "trainer"):
        settings = config.get(part) or {}
        lines += [f"### {part}", "", "| key | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in settings.items()] + [""]
    return lines


def _monitor(training_log: dict[str, Any]) -> str:
    """The metric the run ranked its checkpoints by (logs written before it was recorded: val/combined)."""
    return training_log.get("monitor") or "val/combined"


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)
