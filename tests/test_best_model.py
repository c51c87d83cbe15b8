"""The best model is chosen by the training objective on the validation universes, and the plots say what is flat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import demo_args, run_dir
from matplotlib.backends.backend_agg import FigureCanvasAgg

from atheria_lightning.cli import main
from atheria_lightning.figures import summary_figure


def _monitor_config(tmp_path: Path, monitor: str) -> str:
    path = tmp_path / f"monitor-{monitor.replace('/', '_')}.yaml"
    path.write_text(f"""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{top_k: 5, every_n_episodes: 2, monitor: {monitor}}}
""")
    return str(path)


def test_best_files_are_ranked_by_val_loss_and_a_resume_may_not_rank_by_another(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(demo_args(tmp_path, "--trainer.max_steps", "4", episodes=8, val_every=2)) == 0
    manifest = run_dir(tmp_path) / "checkpoints" / "MANIFEST.json"
    before = manifest.read_text()
    log = json.loads((run_dir(tmp_path) / "exports" / "training_log.json").read_text())
    losses = {row["episode"]: row["loss"] for row in log["validations"]}
    bests = {entry["episode"]: entry["metric"] for entry in log["checkpoints"] if entry["kind"] == "best"}
    assert log["monitor"] == "val/loss" and bests and all(bests[e] == losses[e] for e in bests)
    capsys.readouterr()

    code = main(demo_args(tmp_path, "--config", _monitor_config(tmp_path, "val/combined"), episodes=8, val_every=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("atheria: error: SmartCheckpoint.monitor='val/combined' differs from the checkpoint's "
                             "'val/loss': this run's best checkpoints are ranked by")  # fmt: skip
    assert manifest.read_text() == before, "nothing trained, nothing kept or dropped"


def test_a_constant_series_is_drawn_flat_and_named_constant_never_on_an_offset_axis() -> None:
    episodes = [{"episode": e, "loss": 3.0 - 0.01 * e, "survival": 0.2 + 1e-8 * (e % 3), "symmetry": 0.1,
                 "complexity": 1.0, "noise_level": 0.0} for e in range(40)]  # fmt: skip
    figure = summary_figure({"episodes": episodes, "validations": [], "monitor": "val/loss"})
    survival = figure.axes[1]
    assert survival.get_title() == "Survival: constant at 0.2 over the run (no signal)"
    FigureCanvasAgg(figure).draw()  # the offset text is set when the axis is drawn
    assert survival.yaxis.get_offset_text().get_text() == "", "float noise is not magnified into a curve"
    low, high = survival.get_ylim()
    assert high - low >= 0.5
    assert figure.axes[2].get_title() == "Checkpoint timeline (top-k by val/loss)"
