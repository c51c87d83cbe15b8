"""A ``--notify`` URL holds a service's secret (a bot token, a password): no file of the run folder or of its mirror
records it, W&B's and TensorBoard's included, whether the URL came from the command line or a config file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Sink, demo_args, run_dir
from jsonargparse import Namespace

from atheria_lightning.cli import main
from atheria_lightning.redact import REDACTED, notify_urls, redacted_argv, without_notify_urls

wandb = pytest.importorskip("wandb")
pytest.importorskip("apprise")

#: Characters that a URL percent-encodes, so that both spellings are looked for.
PASSWORD = "pw!of*the+sink"
BOT_ID, BOT_SECRET = "123456789", "AAHsecretOfTheBot_x7Q"
API_KEY = "0123456789abcdef" * 2 + "fedcba98"  # W&B's key: 40 hex digits


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # W&B offline, with every folder it may write to under tmp_path, and an API key it must not record.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    # Telegram through a proxy that refuses: its message fails here instead of reaching api.telegram.org.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


def files_holding(root: Path, secrets: list[str]) -> list[tuple[str, str]]:
    """Every (file, secret) pair where a file under ``root`` holds a secret in its raw bytes."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                continue  # a link: its target is read where it lies, under the same root
            data = path.read_bytes()
            found += [(str(path.relative_to(root)), secret) for secret in secrets if secret.encode() in data]
    return found


def test_no_notify_secret_is_in_any_file_of_the_run_or_its_mirror(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = run_dir(tmp_path)
    config = tmp_path / "run.yaml"  # TensorBoard and W&B, and one URL as a preset would give it
    config.write_text(f"""notify: ["tgram://{BOT_ID}:{BOT_SECRET}/4242/"]
trainer:
  logger:
    - class_path: atheria_lightning.loggers.BufferedTensorBoardLogger
      init_args: {{save_dir: {run}, name: logs, version: ""}}
    - class_path: lightning.pytorch.loggers.WandbLogger
""")
    port = sink.server.server_address[1]
    url = f"json://user:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/"
    args = demo_args(tmp_path, "--config", str(config), "--notify+", url, episodes=4, val_every=2)
    # As the console script runs it: W&B reads the command line from sys.argv.
    monkeypatch.setattr(sys, "argv", ["atheria", *args])
    with caplog.at_level(logging.WARNING):
        assert main() == 0
    # Both URLs were in effect: the sink heard from its own, Telegram (through the refusing proxy) was tried.
    assert [message["title"] for message in sink.received] == ["atheria demo: finished"]
    assert any("to Telegram (" in record.getMessage() for record in caplog.records)
    assert sys.argv == ["atheria", *args], "the command line is the user's again"
    assert list((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")), "W&B recorded the run"
    assert list((run / "logs").glob("events.out.tfevents.*")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "exports" / "report.md").is_file() and (run / "exports" / "training_log.json").is_file()
    assert (tmp_path / "mirror" / "demo" / "logs" / "wandb").is_dir(), "the mirror has W&B's files"

    secrets = [PASSWORD, quote(PASSWORD, safe=""), BOT_SECRET, API_KEY]
    assert files_holding(tmp_path / "runs", secrets) == []
    assert files_holding(tmp_path / "mirror", secrets) == []

    # `atheria validate` with the same command line: Lightning starts W&B itself there, with no resume of ours.
    runs_before = set((run / "logs" / "wandb").glob("offline-run-*"))
    monkeypatch.setattr(sys, "argv", ["atheria", "validate", *args[1:]])
    assert main() == 0
    wandb.finish()  # as the process's exit would: W&B writes the run's metadata by then
    assert set((run / "logs" / "wandb").glob("offline-run-*")) - runs_before, "W&B recorded the validation"
    assert files_holding(tmp_path / "runs", secrets) == []


def test_no_spelling_of_a_url_reaches_wandbs_record_of_the_command_line_or_the_saved_config(tmp_path: Path) -> None:
    # A Notify callback listed in trainer.callbacks builds its own Notifier from the config: its URLs count too.
    hook = "json://u:Secret6@host/"
    notifier = Namespace(class_path="atheria_lightning.notifier.Notifier", init_args=Namespace(urls=[hook]))
    callback = Namespace(class_path="atheria_lightning.callbacks.Notify", init_args=Namespace(notifier=notifier))
    config = Namespace(notify=["ntfy://Secret3"], trainer=Namespace(callbacks=[callback]))
    assert notify_urls(config) == ["ntfy://Secret3", hook]
    assert notify_urls(without_notify_urls(config)) == [] and notify_urls(config), "a copy, the run's own intact"

    path = tmp_path / "run.yaml"
    path.write_text("notify: null\n")
    argv = ["atheria", "fit", "--config", str(path), "--notify", "json://u:Secret1@host/", "--notify=tgram://1:Secret2/3",
            "--notify+", "ntfy://Secret3", "-c", "{notify: ['mailto://u:Secret4@host']}", "-c{notify: x://Secret5}",
            "--trainer.callbacks+", f"{{init_args: {{notifier: {{init_args: {{urls: ['{hook}']}}}}}}}}",
            "--model.lr", "0.1"]  # fmt: skip
    redacted = redacted_argv(argv, notify_urls(config))
    assert [arg for arg in redacted if "Secret" in arg] == []
    assert redacted[:4] == argv[:4], "a config file's path is kept"
    assert redacted[-2:] == ["--model.lr", "0.1"] and "--notify=" + REDACTED in redacted


def test_a_notify_setting_of_another_kind_in_a_users_callback_is_no_url_and_no_crash() -> None:
    own = Namespace(class_path="my.Callback", init_args=Namespace(notify=True, every=3))
    config = Namespace(notify=["ntfy://topic"], trainer=Namespace(callbacks=[own]))
    assert notify_urls(config) == ["ntfy://topic"]
