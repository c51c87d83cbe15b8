"""``--preset NAME``: the packaged ``configs/`` by name, in a checkout, an editable install and a wheel installed in
a fresh venv and run elsewhere; combined with ``--config`` and flags in command-line order; an unknown name is one
line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO, TINY, env_without_warnings

from atheria_lightning.cli import main
from atheria_lightning.curriculum import PHASE_DONE
from atheria_lightning.presets import preset_file, preset_names, presets_folder

FIT_PRESETS = ["colab_free", "colab_pro", "demo", "kaggle"]
#: What a wheel is built from: the files pyproject.toml names (the package, its presets, the readme).
SOURCES = ("pyproject.toml", "README.md", "atheria_lightning", "configs")


def _printed_config(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_presets_are_the_files_of_configs() -> None:
    # A checkout (on PYTHONPATH, or the editable install CI makes): the presets are read where they are.
    assert Path(str(presets_folder())) == CONFIGS
    assert preset_names() == FIT_PRESETS
    assert preset_names("curriculum") == ["curriculum"]
    assert sorted([*FIT_PRESETS, "curriculum"]) == sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert preset_file("demo") == str(CONFIGS / "demo.yaml")


def test_a_preset_is_its_config_file(capsys: pytest.CaptureFixture) -> None:
    assert _printed_config(capsys, "--preset", "kaggle") == _printed_config(
        capsys, "--config", str(CONFIGS / "kaggle.yaml")
    )


# (arguments after the demo preset's position, the experiment_name and data.total_episodes then in effect)
ORDERS = [
    (["--preset", "demo", "--config", "MINE"], "mine", 7),
    (["--config", "MINE", "--preset", "demo"], "demo", 200),
    (["--preset", "demo", "--data.total_episodes", "5"], "demo", 5),
    (["--data.total_episodes", "5", "--preset", "demo"], "demo", 200),
    (["--config", "MINE", "--preset", "demo", "--experiment_name", "last"], "last", 200),
    (["--preset", "colab_free", "--preset=demo"], "demo", 200),
]


@pytest.mark.parametrize(("args", "experiment", "episodes"), ORDERS, ids=[" ".join(a) for a, _, _ in ORDERS])
def test_preset_config_and_flags_apply_in_command_line_order(
    args: list[str], experiment: str, episodes: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("experiment_name: mine\ndata:\n  total_episodes: 7\n")
    printed = _printed_config(capsys, *(str(mine) if arg == "MINE" else arg for arg in args))
    assert (printed["experiment_name"], printed["data"]["total_episodes"]) == (experiment, episodes)
    # What the preset sets and the later arguments do not is the preset's (colab_free's would be 8).
    assert printed["model"]["d_state"] == 4


UNKNOWN = [
    (["fit", "--preset", "colab_fre"],
     "--preset='colab_fre' is not a preset of atheria fit: did you mean colab_free? accepted: colab_free, colab_pro, "
     "demo, kaggle"),
    (["validate", "--preset", "nothing_like_it"],
     "--preset='nothing_like_it' is not a preset of atheria fit: accepted: colab_free, colab_pro, demo, kaggle"),
    (["fit", "--preset", "curriculum"],
     "--preset='curriculum' is not a preset of atheria fit: it is a preset of atheria curriculum; accepted: "),
    (["fit", "--preset"], "--preset needs a value"),
    (["curriculum", "--preset", "demo"],
     "--preset='demo' is not a preset of atheria curriculum: it is a preset of atheria fit; accepted: curriculum"),
    (["curriculum", "--preset", "curiculum"],
     "--preset='curiculum' is not a preset of atheria curriculum: did you mean curriculum? accepted: curriculum"),
    # A command copied from a clone's README, run where there is no clone (this folder has no configs/).
    (["fit", "--config", "configs/colab_free.yaml"],
     "--config='configs/colab_free.yaml' is not a file: give a YAML preset file, or use the packaged copy: "
     "--preset colab_free"),
    (["curriculum", "--config", "configs/curriculum.yaml"],
     "--config='configs/curriculum.yaml' is not a file: give a YAML preset file, or use the packaged copy: "
     "--preset curriculum"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), UNKNOWN, ids=[" ".join(a) for a, _ in UNKNOWN])
def test_an_unknown_preset_or_missing_config_is_one_line_and_creates_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The demo preset's run_root and mirror are relative to this folder (the test's cwd): nothing may appear in it.
    assert main([*args[:1], "--data.total_episodes", "2", *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"atheria: error: {message}") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_curriculum_preset_trains_its_phases(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["curriculum", "--preset", "curriculum", "--run_root", str(tmp_path / "runs"), "--mirror_url", "null",
            "--data.total_episodes", "2", "--data.val_every_episodes", "1", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", *TINY]  # fmt: skip
    assert main(args) == 0
    folder = tmp_path / "runs" / "atheria_curriculum"  # the preset's experiment_name
    for phase in ("Fase1_Vacuum_Stability", "Fase2_Matter_Emergence"):
        assert json.loads((folder / phase / PHASE_DONE).read_text())["episodes"] == 2, phase
    assert "initialised from phase Fase1_Vacuum_Stability" in capsys.readouterr().out


def _copy_sources(destination: Path) -> Path:
    """The files a wheel is built from, copied: a build writes build/ and *.egg-info into its source folder."""
    destination.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def _pip(*args: str) -> None:
    # No build isolation and no index: the test needs no network (setuptools is a dev dependency). Without
    # PYTHONPATH: pip would take the checkout's atheria_lightning.egg-info on it for an installed atheria_lightning.
    command = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    subprocess.run(command, check=True, env=_isolated_env(), timeout=300)


def _isolated_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (the checkout under test is on it, in the way the tests are run)."""
    env = env_without_warnings()
    env.pop("PYTHONPATH", None)
    return {**env, **extra}


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_trains_from_its_own_presets_elsewhere(tmp_path: Path) -> None:
    wheels, elsewhere = tmp_path / "wheels", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
         str(_copy_sources(tmp_path / "src")))  # fmt: skip
    (wheel,) = wheels.glob("atheria_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = {name: archive.read(name) for name in archive.namelist()}
        entry_points = archive.read(next(n for n in packed if n.endswith(".dist-info/entry_points.txt"))).decode()
    # Every module of the checkout, and configs/ byte for byte as the package's presets.
    modules = {str(p.relative_to(REPO)) for p in (REPO / "atheria_lightning").rglob("*.py")}
    assert modules <= set(packed), sorted(modules - set(packed))
    for path in CONFIGS.glob("*.yaml"):
        assert packed[f"atheria_lightning/configs/{path.name}"] == path.read_bytes(), path.name
    assert "atheria = atheria_lightning.cli.main:console_main" in entry_points

    # Installed by pip into a fresh venv, whose dependencies are this venv's: a .pth line puts this venv's
    # site-packages after the fresh one's (the .pth files there, such as an editable install of a checkout, are not
    # run from a path line). The `atheria` console script of the fresh venv runs from a folder outside any checkout.
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    # After pip: it would take this venv's editable install of atheria_lightning for the one to install.
    Path(site_packages, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fit = ["fit", "--preset", "demo", "--data.total_episodes", "2", "--data.val_every_episodes", "1", *TINY]
    curriculum = ["curriculum", "--preset", "curriculum", "--mirror_url", "null", "--data.total_episodes", "1",
                  "--data.val_every_episodes", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                  *TINY]  # fmt: skip
    where = subprocess.run(
        [python, "-c", "import atheria_lightning.presets as p; print(p.__file__); print(p.presets_folder())"],
        cwd=elsewhere, env=_isolated_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    where = where.stdout.split()
    assert where == [f"{site_packages}/atheria_lightning/presets.py", f"{site_packages}/atheria_lightning/configs"]
    for command in (fit, curriculum):
        result = subprocess.run([fresh / "bin" / "atheria", *command], cwd=elsewhere, env=_isolated_env(),
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The demo preset's own settings, relative to where the command ran: ./runs (run_root null) and ./runs_mirror.
    log = json.loads((elsewhere / "runs" / "demo" / "exports" / "training_log.json").read_text())
    assert [row["episode"] for row in log["episodes"]] == [0, 1]
    assert (elsewhere / "runs_mirror" / "demo" / "checkpoints" / "MANIFEST.json").is_file()
    for phase in ("Fase1_Vacuum_Stability", "Fase2_Matter_Emergence"):
        assert (elsewhere / "runs" / "atheria_curriculum" / phase / PHASE_DONE).is_file(), phase


# An editable install's finder, in an interpreter without site (-S): the venv's own .pth files, the editable install
# of another checkout among them, are not run; its packages are put on the path after the install under test.
EDITABLE_DRIVER = """
import site, sys
site.addsitedir(sys.argv[1])
sys.path.append(sys.argv[2])
import atheria_lightning
from atheria_lightning.presets import preset_file, presets_folder
print(atheria_lightning.__file__, presets_folder(), preset_file("demo"), preset_file("curriculum", "curriculum"))
"""


@pytest.mark.slow
def test_an_editable_install_reads_the_checkouts_configs(tmp_path: Path) -> None:
    checkout, installed = _copy_sources(tmp_path / "checkout"), tmp_path / "site"
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(installed), "-e", str(checkout))
    result = subprocess.run(
        [sys.executable, "-S", "-c", EDITABLE_DRIVER, str(installed), sysconfig.get_paths()["purelib"]],
        cwd=tmp_path, env=_isolated_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    package, configs = checkout / "atheria_lightning", checkout / "configs"
    expected = [package / "__init__.py", configs, configs / "demo.yaml", configs / "curriculum.yaml"]
    assert result.stdout.split() == [str(path) for path in expected]
