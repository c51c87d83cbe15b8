"""The YAML presets of ``configs/``, by name: ``--preset colab_free`` is ``--config`` of the packaged file.

``configs/`` at the repository's root is the one source. A wheel carries it as the data package
``atheria_lightning.configs`` (pyproject.toml maps that package onto ``configs/``), so ``pip install git+…`` has the
presets without a clone. In a checkout (an editable install, or the folder on ``PYTHONPATH``) the same files are read
where they are, beside the package.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from jsonargparse import ActionConfigFile

from atheria_lightning.errors import ConfigError, require

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11
    from importlib.resources.abc import Traversable

__all__ = [
    "PresetAction",
    "missing_config_line",
    "preset_file",
    "preset_names",
    "presets_folder",
    "read_preset",
]

#: A fit preset trains one run (``atheria fit``); a curriculum preset lists phases (``atheria curriculum``).
Kind = Literal["fit", "curriculum"]
COMMAND_OF: dict[Kind, str] = {"fit": "atheria fit", "curriculum": "atheria curriculum"}
PRESET_HELP = "A preset shipped with atheria, by name: the same as --config of its file (later settings win)."


def presets_folder() -> Traversable:
    """The folder of preset files: the wheel's packaged copy of ``configs/``, else the checkout's ``configs/``.

    The packaged copy is looked up beside the imported package, never by importing ``atheria_lightning.configs``:
    an editable install of another checkout maps that name onto its own ``configs/``, which would win over the
    checkout on ``PYTHONPATH``.
    """
    packaged = resources.files("atheria_lightning") / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    raise ConfigError(
        f"no presets found (neither {packaged} nor {checkout}): reinstall atheria_lightning, or use --config FILE"
    )


def _kind_of(entry: Traversable) -> Kind:
    # A curriculum is the one kind of preset with phases; it is read only to be told apart, never to train.
    data = yaml.safe_load(entry.read_text(encoding="utf-8"))
    return "curriculum" if isinstance(data, dict) and "phases" in data else "fit"


def preset_names(kind: Kind = "fit") -> list[str]:
    """The names of the presets of one kind, sorted: the file names of ``configs/*.yaml`` without ``.yaml``."""
    entries = [entry for entry in presets_folder().iterdir() if entry.name.endswith(".yaml") and entry.is_file()]
    return sorted(entry.name[: -len(".yaml")] for entry in entries if _kind_of(entry) == kind)


def preset_file(name: str, kind: Kind = "fit") -> str:
    """The path of preset ``name``, for ``--config``; an unknown name is a :class:`ConfigError` naming the accepted."""
    names = preset_names(kind)
    if name not in names:
        command, other = COMMAND_OF[kind], next(other for other in COMMAND_OF if other != kind)
        nearest = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {nearest[0]}? " if nearest else ""
        if name in preset_names(other):
            hint = f"it is a preset of {COMMAND_OF[other]}; "
        raise ConfigError(f"--preset={name!r} is not a preset of {command}: {hint}accepted: {', '.join(names)} "
                          "(or --config FILE for a YAML file of your own)")  # fmt: skip
    entry = presets_folder() / f"{name}.yaml"
    # pip unpacks a wheel, so the file is on disk; only a zipped import (not made by pip) would hold it in an archive.
    require(isinstance(entry, Path), f"--preset={name!r}: the presets are inside an archive ({entry}); use --config")
    return str(entry)


def missing_config_line(path: str, kind: Kind = "fit") -> str:
    """The line for a ``--config`` file that does not exist: most often ``configs/<preset>.yaml`` outside a clone."""
    names = preset_names(kind)
    name = Path(path).name.removesuffix(".yaml")
    problem = f"--config={path!r} is not a file: give a YAML preset file, or"
    if name in names:
        return f"{problem} use the packaged copy: --preset {name}"
    return f"{problem} a preset by name with --preset ({', '.join(names)})"


def read_preset(name: str, kind: Kind = "fit") -> dict[str, Any]:
    """The settings of preset ``name`` as plain YAML (e.g. its ``experiment_name``), without the CLI's checks."""
    data = yaml.safe_load(Path(preset_file(name, kind)).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


class PresetAction(argparse.Action):
    """``--preset NAME`` of ``atheria fit``/``validate``: applies the packaged file exactly as ``--config`` would,
    at its place among the other arguments (so later ones win), and records it among the config files read.

    jsonargparse allows one ``ActionConfigFile`` per parser (``--config``); this action lends its loading instead.
    """

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", f"{PRESET_HELP} One of: {', '.join(preset_names())}.")
        kwargs.setdefault("metavar", "NAME")
        super().__init__(option_strings=option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
        ActionConfigFile.apply_config(parser, cfg, "config", preset_file(str(values)))
