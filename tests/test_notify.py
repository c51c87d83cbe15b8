"""``--notify URL``: finished, stopped, failed, mirror behind and memory alerts reach a local HTTP sink through
apprise's ``json://`` service, each naming the experiment; a dead sink costs one warning line and a bounded wait."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, Sink, demo_args, env_without_warnings, run_dir, wait_for_first_checkpoint

from atheria_lightning import notifier as notifier_module
from atheria_lightning.callbacks import notify as notify_module
from atheria_lightning.callbacks import time_guard
from atheria_lightning.callbacks.resources import memory_percent
from atheria_lightning.cli import main
from atheria_lightning.module import QCAModule

EXPERIMENT = "nightly"


def args(tmp_path: Path, *urls: str, episodes: int = 6, mirror: bool = False, extra: tuple[str, ...] = ()) -> list:
    notify = [arg for url in urls for arg in ("--notify", url)]
    return demo_args(tmp_path, "--experiment_name", EXPERIMENT, *notify, *extra, episodes=episodes, mirror=mirror)


def titles(sink: Sink) -> list[str]:
    return [message["title"] for message in sink.received]


def assert_named(sink: Sink) -> None:
    assert sink.received, "nothing was sent"
    for message in sink.received:
        assert message["title"].startswith(f"atheria {EXPERIMENT}: "), message


def notifier_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name.startswith("atheria_lightning") and "notification" in record.getMessage()]  # fmt: skip


# ----- the events -----
def test_a_finished_run_notifies_every_url_once_with_the_best_value(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[dict[str, float]] = []

    def counted(device: torch.device) -> dict[str, float]:
        reads.append(memory_percent(device))  # ResourceMonitor's own measurement, on this machine
        return reads[-1]

    monkeypatch.setattr(notify_module, "memory_percent", counted)
    # Repeated on the command line, --notify adds (jsonargparse alone would keep the last one).
    assert main(args(tmp_path, f"{sink.url}first", f"{sink.url}second")) == 0
    assert_named(sink)
    assert sorted(message["path"] for message in sink.received) == ["/first", "/second"]
    message = sink.received[0]
    assert message["title"] == f"atheria {EXPERIMENT}: finished" and message["type"] == "success"
    best = min(entry["metric"] for name, entry in _manifest(tmp_path).items() if name.startswith("best-"))
    assert message["message"].startswith("Training finished: episode 6 of 6 (100%). Best val/loss ")
    assert f"val/loss {best:.4g} " in message["message"]
    # Memory is read at a bounded rate: 6 quick episodes fit in one MEMORY_CHECK_SECONDS, so once.
    assert len(reads) == 1 and set(reads[0]) == {"RAM"} and 0.0 < reads[0]["RAM"] <= 100.0
    # The URLs hold tokens: the run folder (and so its mirror) never records them.
    saved = [path for path in tmp_path.rglob("*") if path.is_file() and sink.url.encode() in path.read_bytes()]
    assert saved == [], saved
    assert (tmp_path / "runs" / EXPERIMENT / "logs" / "config.yaml").is_file()


def test_a_time_guard_stop_says_where_and_how_to_continue(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in test_session_budget: a session a minute old is past 90% of 0.0005 h, so the guard stops after episode 1.
    monkeypatch.setattr(time_guard, "process_age_seconds", lambda: 60.0)
    assert main(args(tmp_path, sink.url, extra=("--max_hours", "0.0005"))) == 0
    assert_named(sink)
    assert titles(sink) == [f"atheria {EXPERIMENT}: stopped at episode 1 of 6 (17%)"]
    body = sink.received[0]["message"]
    assert "time limit: 90% of the 0.0005 h budget reached" in body
    assert body.endswith("run the same command again to continue.")


def test_a_non_finite_failure_is_sent_with_its_exit_code(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_episode = QCAModule.run_episode

    def nan_episode(self: QCAModule, *a: Any, **kw: Any) -> Any:
        parts, final = real_episode(self, *a, **kw)
        return {**parts, "loss": parts["loss"] * float("nan")}, final

    monkeypatch.setattr(QCAModule, "run_episode", nan_episode)
    assert main(args(tmp_path, sink.url, extra=("--model.max_nonfinite_episodes", "2"))) == 3
    assert_named(sink)
    assert titles(sink) == [f"atheria {EXPERIMENT}: failed (exit 3)"]
    assert sink.received[0]["type"] == "failure"
    body = sink.received[0]["message"]
    assert body.startswith("Failed at episode 2 of 6 (33%) with exit code 3: error: 2 consecutive episodes had a "
                           "non-finite loss")  # fmt: skip


def test_a_mirror_behind_at_the_end_is_sent_after_finished(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import fsspec
    from test_store import ReadOnlyAfterFirstManifest

    fsspec.register_implementation("romem", ReadOnlyAfterFirstManifest, clobber=True)
    monkeypatch.setattr(ReadOnlyAfterFirstManifest, "broken", False)
    monkeypatch.setattr(ReadOnlyAfterFirstManifest, "writable_again", False)
    config = tmp_path / "notify.yaml"  # a list in YAML, as a preset would give it
    config.write_text(f"""notify: ["{sink.url}"]
trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {{every_n_episodes: 2, max_retries: 1, backoff_s: 0.0, flush_timeout_s: 10}}
""")
    url = f"romem://notify-{os.getpid()}-{time.monotonic_ns()}"
    run = [*demo_args(tmp_path, "--experiment_name", EXPERIMENT, "--mirror_url", url, episodes=4, val_every=2),
           "--config", str(config)]  # fmt: skip
    assert main(run) == 4
    assert_named(sink)
    assert titles(sink) == [f"atheria {EXPERIMENT}: finished", f"atheria {EXPERIMENT}: mirror behind (exit 4)"]
    assert sink.received[1]["message"].startswith("Mirror behind: episode ")
    assert sink.received[1]["message"].endswith("run the same command again to retry.")


def test_memory_at_90_percent_is_sent_once_per_session(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings = iter([{"RAM": 40.0}, {"RAM": 50.0, "GPU memory": 20.0}, {"RAM": 60.0, "GPU memory": 93.0}])
    reads: list[torch.device] = []

    def fake_memory(device: torch.device) -> dict[str, float]:
        reads.append(device)
        return next(readings, {"RAM": 99.0})

    monkeypatch.setattr(notify_module, "memory_percent", fake_memory)
    monkeypatch.setattr(notify_module, "MEMORY_CHECK_SECONDS", 0.0)  # every episode, to see that it alerts once
    assert main(args(tmp_path, sink.url)) == 0
    assert_named(sink)
    assert titles(sink) == [f"atheria {EXPERIMENT}: GPU memory at 93%", f"atheria {EXPERIMENT}: finished"]
    assert sink.received[0]["message"].startswith("RAM 60%, GPU memory 93% at episode 3 of 6 (50%)")
    assert len(reads) == 3, "no reading after the alert"


# ----- a dead sink never fails nor holds up the run -----
def test_a_refusing_sink_is_one_warning_and_the_run_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        assert main(args(tmp_path, f"json://127.0.0.1:{port}/")) == 0
    warnings = notifier_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"notification 'atheria {EXPERIMENT}: finished' to JSON (json://127.0.0.1:{port}/) "
                                  "not sent: ")  # fmt: skip
    assert not [record for record in caplog.records if record.name.startswith("apprise")], "apprise's own lines"
    assert "Traceback" not in capsys.readouterr().err


def test_a_silent_sink_costs_one_warning_and_a_bounded_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    closes: list[float] = []
    real_close = notifier_module.Notifier.close

    def timed_close(self: notifier_module.Notifier, timeout_s: float | None = None) -> None:
        started = time.monotonic()
        real_close(self, timeout_s)
        closes.append(time.monotonic() - started)

    monkeypatch.setattr(notifier_module, "DRAIN_SECONDS", 1.0)
    monkeypatch.setattr(notifier_module.Notifier, "close", timed_close)
    with socket.socket() as silent, caplog.at_level(logging.WARNING):
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog, and nothing ever answers
        url = f"json://127.0.0.1:{silent.getsockname()[1]}/"
        assert main(args(tmp_path, url)) == 0
    assert len(closes) == 1 and closes[0] < 1.0 + 0.5, closes
    warnings = notifier_warnings(caplog)
    assert warnings == [f"1 notification(s) not sent: JSON ({url}) did not answer within 1 s of the end of the command"]


# ----- bad settings: one line, exit 2, nothing created -----
def test_a_url_apprise_refuses_is_one_line_before_anything_is_created(
    tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture
) -> None:
    assert main(args(tmp_path, sink.url, "telegram-please", mirror=True)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("atheria: error: notify='telegram-please' is not a notification URL apprise accepts")
    assert "ntfy://TOPIC" in err[0] and "tgram://BOT_TOKEN/CHAT_ID" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mirror").exists()
    assert not sink.received


def test_notify_without_apprise_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise raises ImportError, as when not installed
    assert main(args(tmp_path, "ntfy://my-runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['atheria: error: notify needs apprise, which is not installed: pip install '
                   '"atheria_lightning[notify]" (or pip install apprise)']  # fmt: skip
    assert not (tmp_path / "runs").exists()


# ----- a signal -----
@pytest.mark.slow
def test_a_sigterm_stop_is_sent_with_its_reason(tmp_path: Path, sink: Sink) -> None:
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *args(tmp_path, sink.url, episodes=5000)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=env_without_warnings())  # fmt: skip
    try:
        wait_for_first_checkpoint(run_dir(tmp_path, EXPERIMENT))
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, out[-3000:]
    assert_named(sink)
    assert len(sink.received) == 1 and " stopped at episode " in sink.received[0]["title"], sink.received
    assert "; signal: SIGTERM received. " in sink.received[0]["message"]


def _manifest(tmp_path: Path) -> dict[str, Any]:
    return json.loads((run_dir(tmp_path, EXPERIMENT) / "checkpoints" / "MANIFEST.json").read_text())["files"]
