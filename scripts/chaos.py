"""SIGKILL storm against the real CLI: kill training at random moments and inside the run store's writes, rerun, check.

Each round starts ``atheria fit`` on a tiny demo run mirrored to a local folder (it resumes from the previous
round's checkpoints) and kills it with SIGKILL. The child runs with the run store's file writes traced (a line
``CHAOS <target> <before|after>`` and a short pause around every atomic write), so a kill can be aimed at the
moments that matter: a checkpoint write (before or after its rename), a local ``MANIFEST.json`` write (the journal
or the listing), a mirror upload, the mirror's ``MANIFEST.json``; the other rounds kill at a random moment. After
each kill both manifests must parse and every file they list must verify against its entry (or its journalled
pending entry); the next round must resume from a sound checkpoint, losing at most ``2 * every_n_episodes + 1``
episodes (the newest save may be caught while it is written; the one before it is complete, since the store
queues a save only once the previous one is written; and a save may wait one episode for the loss that proves it),
and must remove any temporary file the kill left behind; at the end at most ``top_k`` best checkpoints remain,
locally and on the mirror. The traced writes pause, so a kill lands inside them: they take longer than on an
untraced run, and the episodes lost are counted from that slower writer. The last round
trains to the end; its loss for every episode must equal, bit for bit, an uninterrupted run of the same settings,
and the mirror must then hold exactly the local checkpoints.

Used by tests/test_kill_storm.py (10 kills in CI) and by hand for the soak run, which adds SIGTERM stops (timed),
checkpoint corruption and mirror outages::

    python scripts/chaos.py --kills 30 --soak-rounds 12 --workdir /tmp/atheria-soak
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EPISODE_LINE = re.compile(r"\[episode (\d+)/\d+\]")
RESUME_LINE = re.compile(r"resuming from episode (\d+) of")
CHAOS_LINE = re.compile(r"^CHAOS (\S+) (before|after)$")
#: Where the storm aims its kills, in turn; "random" kills at a random moment after some progress.
TARGETS = ("random", "checkpoint", "manifest", "upload", "mirror-manifest")
STORM_EPISODES = 200
TOP_K = 5  # SmartCheckpoint's default, which the storm's callbacks keep
CHAOS_PAUSE_S = 0.05  # the child pauses this long at each traced point, so a kill aimed there lands there


@dataclass
class StormReport:
    kills: int = 0
    aimed_kills: dict[str, int] = field(default_factory=dict)
    near_write_kills: int = 0
    resumes: int = 0
    max_episodes_lost: int = 0
    leftover_tmp_files_found: int = 0
    listings_checked: int = 0
    most_best_files: int = 0
    total_episodes: int = 0
    final_episode: int = 0
    final_loss: float | None = None
    uninterrupted_final_loss: float | None = None
    losses_equal_uninterrupted: bool = False
    mirror_complete_at_end: bool = False
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


def fit_args(workdir: Path, every: int, mirror: str | None, total: int = 1_000_000) -> list[str]:
    """``atheria fit`` arguments: the tiny demo run in ``workdir``, checkpoint and validation every ``every``."""
    callbacks = workdir / "callbacks.yaml"
    callbacks.write_text(f"""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{every_n_episodes: {every}}}
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {{every_n_episodes: {every}, max_retries: 1, backoff_s: 0.05, flush_timeout_s: 30}}
    - class_path: atheria_lightning.callbacks.ResourceMonitor
      init_args: {{every_n_episodes: 1}}
    - class_path: atheria_lightning.callbacks.TrainingLog
""")
    return [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(callbacks),
        "--run_root", str(workdir / "runs"), "--mirror_url", mirror or "null",
        "--data.total_episodes", str(total), "--data.val_every_episodes", str(every),
        "--model.d_state", "2", "--model.hidden_channels", "4", "--model.grid_size", "8", "--model.qca_steps", "3",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def fit_command(workdir: Path, every: int, mirror: str | None, total: int = 1_000_000) -> list[str]:
    """The child process: this script with ``child``, which traces the store's writes, then runs the CLI."""
    return [sys.executable, "-u", __file__, "child", *fit_args(workdir, every, mirror, total)]


def child(argv: list[str]) -> None:
    """Run ``atheria`` with every atomic write of the run store traced: a line and a pause before and after."""
    from atheria_lightning import files
    from atheria_lightning.console import console_main
    from atheria_lightning.store import manifest, mirror, run_store

    mirror_root = os.path.abspath(argv[argv.index("--mirror_url") + 1]) if "--mirror_url" in argv else None
    real = files.atomic_write

    def traced(fs: Any, path: str, write: Any, before_replace: Any = None) -> None:
        target = _target_of(str(path), mirror_root)
        _mark(target, "before")
        real(fs, path, write, before_replace)
        _mark(target, "after")

    for module in (manifest, mirror, run_store):  # each imported atomic_write by name
        module.atomic_write = traced
    sys.argv = ["atheria", *argv]
    console_main()


def _target_of(path: str, mirror: str | None) -> str:
    on_mirror = mirror is not None and os.path.abspath(path).startswith(mirror + os.sep)
    if path.endswith("MANIFEST.json"):
        return "mirror-manifest" if on_mirror else "manifest"
    if on_mirror:
        return "upload"
    return "checkpoint" if path.endswith(".ckpt") else "other"


def _mark(target: str, when: str) -> None:
    print(f"CHAOS {target} {when}", flush=True)
    time.sleep(CHAOS_PAUSE_S)


class Watched:
    """A training subprocess whose stdout is read line by line as it comes; it can kill itself at a traced point."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=REPO, env=env)  # fmt: skip
        self.reached = 0
        self.resumed_from: int | None = None
        self.lines: list[str] = []
        self.checkpoint_started = threading.Event()
        self.killed_at: str | None = None
        self.every = 0
        self._aim: tuple[str, str] | None = None
        self._armed_after = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def aim(self, target: str, when: str, after_episode: int) -> None:
        """Kill at the first ``CHAOS target when`` line once episode ``after_episode`` is reached."""
        self._armed_after = after_episode
        self._aim = (target, when)

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
            elif (match := CHAOS_LINE.match(line.strip())) and self._aim == match.groups():
                if self.reached >= self._armed_after and self.killed_at is None:
                    self.process.send_signal(signal.SIGKILL)
                    self.killed_at = " ".join(match.groups())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._reader.join(5)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


def tmp_files(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "runs").rglob("*") if ".tmp-" in p.name]


def storm(
    workdir: Path, kills: int, every: int = 10, seed: int = 0, mirror: bool = True, episodes: int = STORM_EPISODES
) -> StormReport:
    """Run ``kills`` kill-and-resume rounds, then a last round that trains to ``episodes`` (or a little past where
    the kills left the run); returns the counts, failures listed."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    mirror_dir = workdir / "mirror" if mirror else None
    mirror_url = str(mirror_dir) if mirror_dir else None
    command = fit_command(workdir, every, mirror_url)  # open-ended while killing; the last round sets the end
    report = StormReport()
    aimed: Counter[str] = Counter()
    targets = TARGETS if mirror else TARGETS[:3]
    previous_reached: int | None = None
    for round_number in range(kills + 1):
        report.leftover_tmp_files_found += len(tmp_files(workdir))
        last_round = round_number == kills
        if last_round:  # at least ``episodes``, and always a few save intervals past where the kills left it
            report.total_episodes = max(episodes, (previous_reached or 0) + 2 * every)
            command = fit_command(workdir, every, mirror_url, report.total_episodes)
        run = Watched(command)
        run.every = every
        try:
            if not _wait(lambda run=run: run.resumed_from is not None or run.reached > 0 or run.process.poll()
                         is not None, 180):  # fmt: skip
                report.failures.append(f"round {round_number}: no progress")
            if previous_reached is not None:
                _check_resume(report, round_number, run, previous_reached, every)
            if last_round:
                if run.wait(900) not in (0, 4):
                    report.failures.append(f"last round: exit {run.process.returncode}: {''.join(run.lines[-5:])}")
                report.final_episode = run.reached
                continue
            start = run.resumed_from or 0
            target = targets[round_number % len(targets)]
            if target == "random":
                _wait(lambda run=run, start=start: run.reached >= start + every or run.process.poll() is not None,
                      180)  # fmt: skip
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                run.aim(target, rng.choice(("before", "after")), after_episode=start + 1)
                if _wait(lambda run=run: run.killed_at is not None or run.process.poll() is not None, 120):
                    aimed[target] += run.killed_at is not None
            if run.process.poll() is not None and run.killed_at is None:
                report.failures.append(f"round {round_number}: exited early: {''.join(run.lines[-5:])}")
        finally:
            if not last_round:
                run.kill()
        report.kills += 0 if last_round else 1
        report.near_write_kills += run.killed_at is not None and run.killed_at.startswith("checkpoint")
        previous_reached = run.reached
        if not last_round:
            _check_listings(report, round_number, workdir, mirror_dir)
    report.aimed_kills = dict(aimed)
    _compare_with_uninterrupted(report, workdir, every, report.total_episodes)
    for folder in [workdir / "runs"] + ([mirror_dir] if mirror_dir is not None else []):
        bests = sorted(path.name for path in (folder / "demo" / "checkpoints").glob("best-*.ckpt"))
        report.most_best_files = max(report.most_best_files, len(bests))
        if len(bests) > TOP_K:
            report.failures.append(f"{folder}: {len(bests)} best checkpoints after the storm, top_k is {TOP_K}")
    if mirror_dir is not None:
        local = workdir / "runs" / "demo" / "checkpoints"
        report.mirror_complete_at_end = _mirror_matches(local, mirror_dir / "demo" / "checkpoints")
        if not report.mirror_complete_at_end:
            report.failures.append("the mirror does not hold exactly the local checkpoints at the end")
    return report


def _check_listings(report: StormReport, round_number: int, workdir: Path, mirror: Path | None) -> None:
    """Right after a kill: every manifest parses, and each file it lists verifies (its entry, or its pending one)."""
    folders = [workdir / "runs" / "demo" / "checkpoints"] + ([mirror / "demo" / "checkpoints"] if mirror else [])
    for folder in folders:
        path = folder / "MANIFEST.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            report.failures.append(f"round {round_number}: {path} does not parse after the kill ({err})")
            continue
        pending = data.get("pending", {})
        for name, entry in data["files"].items():
            report.listings_checked += 1
            if not any(_verifies(folder / name, candidate) for candidate in (entry, pending.get(name)) if candidate):
                report.failures.append(f"round {round_number}: {folder / name} matches neither listed entry")


def _verifies(path: Path, entry: dict[str, Any]) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]


def _losses(workdir: Path) -> list[float | None]:
    log = json.loads((workdir / "runs" / "demo" / "exports" / "training_log.json").read_text())
    return [row["loss"] for row in log["episodes"]]


def _compare_with_uninterrupted(report: StormReport, workdir: Path, every: int, episodes: int) -> None:
    """The storm's losses against one run of the same settings without kills (and without a mirror)."""
    reference = workdir / "uninterrupted"
    reference.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-u", "-m", "atheria_lightning.console", *fit_args(reference, every, None, episodes)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if done.returncode != 0:
        report.failures.append(f"the uninterrupted run failed: {done.stdout[-500:]}")
        return
    try:
        stormed, straight = _losses(workdir), _losses(reference)
    except (OSError, ValueError, KeyError) as err:
        report.failures.append(f"no training log to compare: {err}")
        return
    report.final_loss = stormed[-1] if stormed else None
    report.uninterrupted_final_loss = straight[-1] if straight else None
    report.losses_equal_uninterrupted = stormed == straight and len(straight) == episodes
    if not report.losses_equal_uninterrupted:
        first = next((i for i, (a, b) in enumerate(zip(stormed, straight, strict=False)) if a != b), None)
        report.failures.append(f"losses differ from the uninterrupted run ({len(stormed)} against "
                               f"{len(straight)} episodes, first difference at episode {first})")  # fmt: skip


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
        if reached > every:
            report.failures.append(f"round {round_number}: did not resume (previous run reached {reached})")
        return
    report.resumes += 1
    lost = reached - run.resumed_from
    report.max_episodes_lost = max(report.max_episodes_lost, lost)
    # The bound the store guarantees: a new save is queued only once the previous one is written, so the newest
    # complete save is at most one interval older than the newest asked for (which a kill may catch in flight),
    # and a save may wait one more episode for the loss that proves it sound.
    if not 0 <= lost <= 2 * every + 1:
        report.failures.append(f"round {round_number}: resumed from {run.resumed_from}, killed at {reached}")


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="SmartCheckpoint.every_n_episodes")
    parser.add_argument("--episodes", type=int, default=STORM_EPISODES, help="the storm run's total episodes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/atheria-soak"))
    parser.add_argument("--no-mirror", action="store_true", help="storm without a mirror")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak-rounds", type=int, default=0,
                        help="then this many SIGTERM rounds with corruption and mirror outages")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    report = storm(args.workdir / "storm", args.kills, args.every, args.seed, not args.no_mirror, args.episodes)
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
