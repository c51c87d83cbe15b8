"""The CLI's TensorBoard logger: what is logged reads back in TensorBoard as Lightning's logger writes it."""

from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from atheria_lightning.loggers import BufferedTensorBoardLogger


def test_one_event_per_logging_step_holds_every_number_under_its_tag(tmp_path: Path) -> None:
    logger = BufferedTensorBoardLogger(save_dir=str(tmp_path), name="logs", version="", prefix="phase1")
    for step in range(3):
        logger.log_metrics({"train/loss": torch.tensor(1.0 / (step + 1)), "train/noise_level": 0.5, "epoch": 0}, step)
    logger.log_metrics({"vm/mirror_failures": 2, "val/parts": {"a": 1.0, "b": 2.0}}, step=3)
    logger.finalize("success")

    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [(event.step, event.value) for event in events.Scalars("phase1-train/loss")]
    assert loss == [(0, 1.0), (1, 0.5), (2, as_float32(1.0 / 3))]
    assert [event.value for event in events.Scalars("phase1-train/noise_level")] == [0.5, 0.5, 0.5]
    assert [(event.step, event.value) for event in events.Scalars("phase1-vm/mirror_failures")] == [(3, 2.0)]
    # A dict goes through TensorBoardLogger as before: one run folder per key (add_scalars).
    assert sorted(path.name for path in (tmp_path / "logs").iterdir() if path.is_dir()) == [
        "phase1-val_parts_a", "phase1-val_parts_b"
    ]  # fmt: skip

    event_file = next((tmp_path / "logs").glob("events.out.tfevents.*"))
    summaries = [event for event in EventFileLoader(str(event_file)).Load() if event.HasField("summary")]
    assert [len(event.summary.value) for event in summaries] == [2, 2, 2, 1], "one event per logging step"
    assert "phase1-epoch" not in events.Tags()["scalars"], "Lightning's constant epoch is not a card"


def as_float32(value: float) -> float:
    # TensorBoard stores float32: compare with what float32 makes of the value.
    return float(torch.tensor(value, dtype=torch.float32))
