"""SIGKILL storm against the real CLI: kill training at random moments and near checkpoint writes, rerun, check.

Each round starts ``atheria fit`` on a tiny demo run (it resumes from the previous round's checkpoints), waits,
and kills it with SIGKILL: a third of the rounds within half a second after a checkpoint write starts (right after
an episode that is a multiple of ``every_n_episodes``), the rest at a random moment. The next round must resume
from a checkpoint that verifies against the manifest, losing at most ``every_n_episodes`` episodes, and must find
and remove any temporary file the kill left behind.

Used by tests/test_kill_storm.py (10 kills in CI) and by hand for the soak run, which adds SIGTERM stops (timed),
checkpoint corruption and mirror outages::

    python scripts/chaos.py --kills 30 --soak-rounds 12 --workdir /tmp/atheria-soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPISODE_LINE = re.compile(r"\[episode (\d+)/\d+\]")
RESUME_LINE = re.compile(r"resuming from episode (\d+) of")
TOTAL_EPISODES = 1_000_000


@dataclass
class StormReport:
    kills: int = 0
    near_write_kills: int = 0
    resumes: int = 0
    max_episodes_lost: int = 0
    leftover_tmp_files_found: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class SoakReport:
    """The extra faults of the soak run, beyond the SIGKILL storm."""

    corruptions_injected: int = 0
    corrupt_files_caught: int = 0
    mirror_outages_injected: int = 0
    mirror_sync_failures_logged: int = 0
    sigterm_stops: int = 0
    longest_emergency_stop_seconds: float = 0.0
    mirror_complete_at_end: bool = False
    failures: list[str] = field(default_factory=list)


def fit_command(workdir: Path, every: int, mirror: str | None) -> list[str]:
    callbacks = workdir / "callbacks.yaml"
    callbacks.write_text(f"""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{every_n_episodes: {every}}}
    - class_path: atheria_lightning.callbacks.ResourceMonitor
      init_args: {{every_n_episodes: 1}}
""")
    return [
        sys.executable, "-u", "-m", "atheria_lightning.cli", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--config", str(callbacks), "--run_root", str(workdir / "runs"), "--mirror_url", mirror or "null",
        "--data.total_episodes", str(TOTAL_EPISODES), "--data.val_every_episodes", str(every),
        "--model.d_state", "2", "--model.hidden_channels", "4", "--model.grid_size", "8", "--model.qca_steps", "3",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


class Watched:
    """A training subprocess whose stdout is read line by line as it comes."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=REPO, env=env)  # fmt: skip
        self.reached = 0
        self.resumed_from: int | None = None
        self.lines: list[str] = []
        self.checkpoint_started = threading.Event()
        self.every = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if match := EPISODE_LINE.search(line):
                self.reached = int(match.group(1))
                # SmartCheckpoint runs after ResourceMonitor in the same hook: its write starts right now.
                if self.every and self.reached % self.every == 0:
                    self.checkpoint_started.set()
            elif match := RESUME_LINE.search(line):
                self.resumed_from = int(match.group(1))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._reader.join(5)


def tmp_files(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "runs").rglob("*") if ".tmp-" in p.name]


def storm(workdir: Path, kills: int, every: int = 10, seed: int = 0, mirror: str | None = None) -> StormReport:
    """Run ``kills`` kill-and-resume rounds; returns the counts (failures listed, never raised)."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    command = fit_command(workdir, every, mirror)
    report = StormReport()
    previous_reached: int | None = None
    for round_number in range(kills + 1):
        report.leftover_tmp_files_found += len(tmp_files(workdir))
        run = Watched(command)
        run.every = every
        last_round = round_number == kills
        near_write = not last_round and round_number % 3 == 0
        try:
            if not _wait(lambda run=run: run.reached >= every or run.process.poll() is not None, 180):
                report.failures.append(f"round {round_number}: no progress")
            if previous_reached is not None:
                _check_resume(report, round_number, run, previous_reached, every)
            if last_round:
                continue
            if near_write:
                run.checkpoint_started.clear()
                run.checkpoint_started.wait(60)
                time.sleep(rng.uniform(0.0, 0.5))
                report.near_write_kills += 1
            else:
                time.sleep(rng.uniform(0.0, 2.0))
            if run.process.poll() is not None:
                report.failures.append(f"round {round_number}: exited early: {''.join(run.lines[-5:])}")
        finally:
            run.kill()
        report.kills += 0 if last_round else 1
        previous_reached = run.reached
    return report


STOP_LINE = re.compile(r"stopped at episode (\d+) of .*checkpoint and mirror flush took ([0-9.]+) s")


def soak(workdir: Path, rounds: int, every: int = 10, seed: int = 0) -> SoakReport:
    """Corrupt checkpoints, take the mirror away mid-run and stop with SIGTERM, round after round.

    Each round trains for a moment and is stopped with SIGTERM (the emergency path is timed from its own
    message). Every other round first damages the newest local checkpoint (truncated or one byte flipped), which the
    next start must catch and move aside; every third round replaces the mirror folder by a file while training
    runs (a Drive mount gone read-only or over quota), so mirror writes fail until it is put back.
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    mirror = workdir / "mirror"
    command = fit_command(workdir, every, str(mirror))
    report = SoakReport()
    checkpoints = workdir / "runs" / "demo" / "checkpoints"
    for round_number in range(rounds):
        if round_number % 2 == 1 and _damage_newest(checkpoints, rng):
            report.corruptions_injected += 1
        run = Watched(command)
        run.every = every
        outage = round_number % 3 == 2
        try:
            if not _wait(lambda run=run: run.reached >= every or run.process.poll() is not None, 180):
                report.failures.append(f"soak round {round_number}: no progress")
            if outage:
                report.mirror_outages_injected += 1
                _take_mirror_away(mirror)
            time.sleep(rng.uniform(0.5, 2.0))
            if outage:
                _put_mirror_back(mirror)
            run.process.send_signal(signal.SIGTERM)
            run.process.wait(300)
            run._reader.join(5)
        finally:
            run.kill()
        out = "".join(run.lines)
        report.mirror_sync_failures_logged += len(re.findall(r"mirror sync .* failed", out))
        if (stopped := STOP_LINE.search(out)) is None or run.process.returncode != 0:
            report.failures.append(f"soak round {round_number}: no clean stop (exit {run.process.returncode})")
            continue
        report.sigterm_stops += 1
        report.longest_emergency_stop_seconds = max(report.longest_emergency_stop_seconds, float(stopped.group(2)))
    report.corrupt_files_caught = len(list((checkpoints / "corrupt").glob("*"))) if checkpoints.exists() else 0
    report.mirror_complete_at_end = _mirror_matches(checkpoints, mirror / "demo" / "checkpoints")
    return report


def _damage_newest(checkpoints: Path, rng: random.Random) -> bool:
    manifest = checkpoints / "MANIFEST.json"
    if not manifest.exists():
        return False
    files = json.loads(manifest.read_text())["files"]
    if not files:
        return False
    name = max(files, key=lambda n: (files[n]["episode"], files[n]["kind"] != "best"))
    path = checkpoints / name
    data = path.read_bytes()
    if rng.random() < 0.5:
        path.write_bytes(data[: len(data) // 2])
    else:
        index = rng.randrange(len(data))
        path.write_bytes(data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :])
    return True


def _take_mirror_away(mirror: Path) -> None:
    if mirror.exists():
        mirror.rename(mirror.with_name("mirror.away"))
    mirror.write_text("the mirror is unreachable")


def _put_mirror_back(mirror: Path) -> None:
    mirror.unlink(missing_ok=True)
    away = mirror.with_name("mirror.away")
    if away.exists():
        away.rename(mirror)


def _mirror_matches(local: Path, remote: Path) -> bool:
    try:
        local_files = json.loads((local / "MANIFEST.json").read_text())["files"]
        remote_files = json.loads((remote / "MANIFEST.json").read_text())["files"]
    except (FileNotFoundError, ValueError):
        return False
    same = {n: e["sha256"] for n, e in local_files.items()} == {n: e["sha256"] for n, e in remote_files.items()}
    return same and all((remote / name).stat().st_size == entry["size"] for name, entry in remote_files.items())


def _check_resume(report: StormReport, round_number: int, run: Watched, reached: int, every: int) -> None:
    if run.resumed_from is None:
        if reached >= every:
            report.failures.append(f"round {round_number}: did not resume (previous run reached {reached})")
        return
    report.resumes += 1
    lost = reached - run.resumed_from
    report.max_episodes_lost = max(report.max_episodes_lost, lost)
    if not 0 <= lost <= every:
        report.failures.append(f"round {round_number}: resumed from {run.resumed_from}, killed at {reached}")


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="SmartCheckpoint.every_n_episodes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/atheria-soak"))
    parser.add_argument("--mirror", default=None, help="mirror_url for the runs (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak-rounds", type=int, default=0,
                        help="then this many SIGTERM rounds with corruption and mirror outages")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    report = storm(args.workdir / "storm", args.kills, args.every, args.seed, args.mirror)
    print(json.dumps({"storm": asdict(report), "seconds": round(time.monotonic() - started, 1)}), flush=True)
    failures = list(report.failures)
    if args.soak_rounds:
        started = time.monotonic()
        soaked = soak(args.workdir / "soak", args.soak_rounds, args.every, args.seed)
        print(json.dumps({"soak": asdict(soaked), "seconds": round(time.monotonic() - started, 1)}), flush=True)
        failures += soaked.failures + ([] if soaked.mirror_complete_at_end else ["mirror incomplete at the end"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
