"""TorchScript export: each operator round-trips from its checkpoint, inference runs, bad input writes nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from atheria_lightning import export
from atheria_lightning.errors import ConfigError
from atheria_lightning.models import OPERATORS
from atheria_lightning.module import QCAModule
from atheria_lightning.physics import Stepper, initial_state, rollout

TINY_MODEL = {"d_state": 2, "hidden_channels": 4, "grid_size": 8, "qca_steps": 2}


def _save_checkpoint(architecture: str, path: Path) -> Path:
    """A Lightning checkpoint of a fresh operator whose weights are moved away from their near-zero start."""
    model = QCAModule(architecture=architecture, **TINY_MODEL)
    with torch.no_grad():  # the output layer starts at std 1e-5: make the outputs large enough to compare
        for parameter in model.operator.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    trainer = Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(path.parent)
    )
    trainer.strategy.connect(model)  # what fit does first; enough to write the checkpoint as fit would
    trainer.save_checkpoint(path, weights_only=False)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: _save_checkpoint(name, folder / f"{name}.ckpt") for name in OPERATORS}


def _operator(ckpt: Path) -> torch.nn.Module:
    return QCAModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).operator.eval()


def _input(batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 2 * TINY_MODEL["d_state"], 8, 8, generator=generator)  # (B, 2d, H, W)


@pytest.mark.parametrize("architecture", list(OPERATORS))
def test_exported_operator_gives_the_checkpoint_operators_output(
    architecture: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    output = export.export_checkpoint(checkpoints[architecture], tmp_path / "exports" / "model.ts")
    scripted, operator = export.load(output), _operator(checkpoints[architecture])
    x = _input()
    with torch.no_grad():
        if OPERATORS[architecture].recurrent:  # two steps, so the carried memory is compared too
            expected, memory = operator(x, None)
            expected, _ = operator(x, memory)
            got, memory = scripted(x, None)
            got, _ = scripted(x, memory)
        else:
            expected, got = operator(x), scripted(x)
    assert expected.abs().max() > 1e-3, "the comparison must not be between two near-zero outputs"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    metadata = export.load_metadata(output)
    cls = OPERATORS[architecture]
    assert metadata["architecture"] == architecture and metadata["export_method"] == "script"
    assert (metadata["recurrent"], metadata["multiplicative"]) == (cls.recurrent, cls.multiplicative)
    assert {metadata[key] for key in ("d_state", "hidden_channels", "grid_size")} == {2, 4, 8}
    assert metadata["gamma_decay"] == pytest.approx(0.01)


@pytest.mark.parametrize("architecture", ["UNET_UNITARY", "UNET_CONVLSTM"])
def test_inference_rollout_matches_the_training_engine_without_noise(
    architecture: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    output = export.export_checkpoint(checkpoints[architecture], tmp_path / "model.ts")
    psi = export.rollout_scripted(export.load(output), export.load_metadata(output), steps=3, seed=3, universes=2)
    psi0 = initial_state("random", 2, 8, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = rollout(Stepper(_operator(checkpoints[architecture])), psi0, steps=3, gamma=0.01).final
    assert psi.shape == (2, 8, 8, 2) and psi.dtype == torch.complex64
    torch.testing.assert_close(psi, expected, rtol=1e-5, atol=1e-6)

    picture = export.save_psi_image(psi, tmp_path / "psi.png")
    assert picture.read_bytes().startswith(b"\x89PNG")
    assert export.psi_magnitude(psi).shape == (8, 8)


@pytest.mark.parametrize("architecture", ["MLP", "UNET_CONVLSTM"])
def test_trace_is_the_fallback_when_scripting_fails(
    architecture: str, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_script(module: torch.nn.Module) -> None:
        raise RuntimeError("scripting unsupported here")

    monkeypatch.setattr(torch.jit, "script", no_script)
    output = export.export_checkpoint(checkpoints[architecture], tmp_path / "model.ts")
    monkeypatch.undo()
    metadata = export.load_metadata(output)
    assert metadata["export_method"] == "trace"
    psi = export.rollout_scripted(export.load(output), metadata, steps=2, seed=1)
    psi0 = initial_state("random", 1, 8, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = rollout(Stepper(_operator(checkpoints[architecture])), psi0, steps=2, gamma=0.01).final
    torch.testing.assert_close(psi, expected, rtol=1e-5, atol=1e-6)


def test_cli_exports_and_says_how(checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "model.ts"
    assert export.main(["--ckpt_path", str(checkpoints["UNET"]), "--output", str(output)]) == 0
    assert f"exported UNET (script) from {checkpoints['UNET']} to {output}" in capsys.readouterr().out
    assert isinstance(export.load(output), torch.jit.ScriptModule)


def _unbuildable(checkpoint: Path, folder: Path, **hparams: object) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"].update(hparams)
    torch.save(state, folder / "unbuildable.ckpt")
    return folder / "unbuildable.ckpt"


BAD_INPUTS = {
    "missing file": (lambda ckpt, folder: folder / "nope.ckpt", "does not exist"),
    "text file": (lambda ckpt, folder: _write(folder / "notes.ckpt", b"not a checkpoint\n"), "is not a checkpoint"),
    "tensor file": (
        lambda ckpt, folder: _save(folder / "tensor.ckpt", torch.zeros(3)),
        "is not a Lightning checkpoint",
    ),
    "unsafe pickle": (lambda ckpt, folder: _save(folder / "evil.ckpt", {"x": argparse.Namespace()}), "weights_only"),
    "no architecture": (lambda ckpt, folder: _save(folder / "bare.ckpt", {"state_dict": {}}), "cannot be rebuilt"),
    "shapes differ": (lambda ckpt, folder: _unbuildable(ckpt, folder, hidden_channels=8), "cannot be rebuilt"),
    "unknown operator": (lambda ckpt, folder: _unbuildable(ckpt, folder, architecture="FOO"), "cannot be rebuilt"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(
    case: str, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make, message = BAD_INPUTS[case]
    bad = make(checkpoints["MLP"], tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert export.main(["--ckpt_path", str(bad), "--output", str(out_dir / "model.ts")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atheria: error: --ckpt_path=") and message in err and "\n" not in err, err
    assert list(out_dir.iterdir()) == [], "nothing may be written, not even a temporary file"
    with pytest.raises(ConfigError, match=message):
        export.export_checkpoint(bad, out_dir / "model.ts")


def test_output_that_is_a_folder_is_rejected(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        export.export_checkpoint(checkpoints["MLP"], tmp_path)
