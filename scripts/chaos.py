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

``--two-machines ROUNDS`` runs, instead, two machines against one mirror (the lease of
``atheria_lightning/store/lease.py``): each round starts two traced trainers, A and B, each with its own run folder
(kept from round to round) and the same ``--mirror_url``, in one of three orders (A, then B with ``--take_over true``
at a random delay; B, then A; both nearly at once); every fourth round no start has ``--take_over``, and the later
one must be refused with exit 5, training nothing. Each trainer gets SIGKILL at a random episode, at a traced write
or while the other one starts; every fourth round nothing is killed before one is superseded, refused or done. The
schedule comes from ``--seed`` alone. A thread reads the mirror's ``MANIFEST.json`` every few milliseconds and
records each ``last.ckpt`` episode and ``generation`` it lists. After each round: every exit code is 0, 5 or
SIGKILL's, a 5 says why (refused, or taken over by a start with ``--take_over``), and the one taken over from stops;
the mirror's and both machines' manifests parse and every file they list verifies; the mirror never listed an older
``last.ckpt`` than before, nor a manifest written by a session without a lease; and a fresh machine (a new run
folder, no take-over: the trainers' processes are gone) resumes from the newest episode the mirror lists, which is
the newest the watcher ever saw listed (or one a killed sync journalled as pending). It prints one
``{"two_machines": ...}`` line::

    python scripts/chaos.py --two-machines 20 --seed 7 --workdir /tmp/atheria-two-machines
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
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


def fit_args(workdir: Path, every: int, mirror: str | None, total: int = 1_000_000, share: float = 0.1) -> list[str]:
    """``atheria fit`` arguments: the tiny demo run in ``workdir``, checkpoint and validation every ``every``; a sync
    may take ``share`` of the time between two (MirrorSync's ``max_share``) before their interval doubles."""
    callbacks = workdir / "callbacks.yaml"
    callbacks.write_text(f"""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{every_n_episodes: {every}}}
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {{every_n_episodes: {every}, max_retries: 1, backoff_s: 0.05, flush_timeout_s: 30, max_share: {share}}}
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


def fit_command(workdir: Path, every: int, mirror: str | None, total: int = 1_000_000, share: float = 0.1) -> list[str]:
    """The child process: this script with ``child``, which traces the store's writes, then runs the CLI."""
    return [sys.executable, "-u", __file__, "child", *fit_args(workdir, every, mirror, total, share)]


def child(argv: list[str]) -> None:
    """Run ``atheria`` with every atomic write of the run store traced: a line and a pause before and after."""
    from atheria_lightning import files
    from atheria_lightning.cli.main import console_main
    from atheria_lightning.store import copies, manifest, run_store, uploader, writer

    mirror_root = os.path.abspath(argv[argv.index("--mirror_url") + 1]) if "--mirror_url" in argv else None
    real = files.atomic_write

    def traced(fs: Any, path: str, write: Any, before_replace: Any = None) -> None:
        target = _target_of(str(path), mirror_root)
        _mark(target, "before")
        real(fs, path, write, before_replace)
        _mark(target, "after")

    for module in (copies, manifest, run_store, uploader, writer):  # each imported atomic_write by name
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
    """A training subprocess whose stdout is read line by line as it comes; it can kill itself at a traced point.

    ``training_since`` is when it first said it trains (a resume line or an episode line: both come after the start
    took the mirror's lease); ``said`` is when each of ``phrases`` first appeared in its output."""

    def __init__(self, command: list[str], phrases: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=REPO, env=env)  # fmt: skip
        self.reached = 0
        self.resumed_from: int | None = None
        self.lines: list[str] = []
        self.checkpoint_started = threading.Event()
        self.killed_at: str | None = None
        self.every = 0
        self.training_since: float | None = None
        self.phrases = phrases
        self.said: dict[str, float] = {}
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
            for phrase in self.phrases:
                if phrase in line:
                    self.said.setdefault(phrase, time.monotonic())
            if self.training_since is None and (EPISODE_LINE.search(line) or RESUME_LINE.search(line)):
                self.training_since = time.monotonic()
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
    command = [sys.executable, "-u", "-m", "atheria_lightning.cli", *fit_args(reference, every, None, episodes)]
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
        # No checkpoint yet is within the bound below: on a loaded machine the first save (held one episode for
        # its proof, then written in the background) may still be on its way when the kill comes.
        if reached > 2 * every + 1:
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


# ----- two machines, one mirror -----

#: How a round starts its two trainers: A, then B at a delay; B, then A; both nearly at once.
ORDERS = ("a_then_b", "b_then_a", "at_once")
#: The traced writes a two-machine kill may be aimed at (the local manifest's are the storm's).
AIMS = ("checkpoint", "upload", "mirror-manifest")
REFUSED_LINE = "is in use by another session"
TAKEN_OVER_LINE = "mirror: taken over from another session"
SUPERSEDED_LINE = "mirror taken over by another session"
FINISHED_LINE = re.compile(r"run finished: episode (\d+) of")
#: A checkpoint and a sync every 5 episodes: a round of a few dozen episodes sees several of each.
TWO_MACHINES_EVERY = 5
#: MirrorSync's ``max_share``: the traced writes pause, so a sync takes longer than 5 fast episodes; at the default
#: 0.1 the interval would soon reach its 16-fold cap, a sync each 80 episodes, and rounds would see few of them.
SYNC_SHARE = 0.9
#: The episodes past the round's start that a first trainer may run when nothing but a take-over or a kill is meant
#: to stop it: far more than it trains while the second one starts, so that it still trains when that one does.
OPEN_CAP = 400
ROUND_TIMEOUT_S = 300.0


@dataclass
class TwoMachinesReport:
    rounds: int = 0
    orders: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    kills_by_plan: dict[str, int] = field(default_factory=dict)
    refusals: int = 0
    take_overs: int = 0
    superseded_exits: int = 0
    finished_exits: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    manifest_reads: int = 0
    unreadable_reads: int = 0
    listings_seen: int = 0
    #: Listings of an older lease generation than one listed before: a session wrote the mirror's manifest after a
    #: later session had taken the lease and written it. Recorded, not a failure: what the lease promises is that
    #: last.ckpt never goes back, which ``failures`` checks.
    generation_went_back: list[str] = field(default_factory=list)
    max_generation: int = 0
    files_verified: int = 0
    fresh_resumes: int = 0
    resumed_from_pending: int = 0
    most_episodes_after_take_over: int = 0
    max_episode: int = 0
    #: One line a round: its order, each trainer's flags, plan and end, where the fresh machine resumed.
    round_log: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class MirrorWatcher:
    """Reads the mirror's manifest every few milliseconds, as a person or a notebook on a third machine would, and
    records each change of what it lists: the ``generation`` that wrote it and the ``last.ckpt`` episode (-1: none).

    ``problems`` collects every listing of an older ``last.ckpt`` than one listed before, and every listing by a
    session that holds no lease (generation 0 once a leased session has written: a start that was refused, say).
    A manifest that cannot be read or parsed (replaced in the middle of the read) is counted and skipped: the next
    read gets the new one."""

    def __init__(self, path: Path, interval_s: float = 0.003) -> None:
        self.path, self.interval_s = path, interval_s
        self.seen: list[tuple[int, int]] = []
        self.problems: list[str] = []
        self.highest = -1
        self.max_generation = 0
        self.generation_went_back: list[str] = []
        self.reads = 0
        self.unreadable = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read_now()

    def read_now(self) -> None:
        """One read, recorded; under the lock, so that the thread's reads and a caller's are recorded in read order."""
        with self._lock:
            try:
                data = json.loads(self.path.read_bytes())
                last = data["files"].get("last.ckpt")
                entry = (int(data.get("generation", 0)), int(last["episode"]) if last else -1)
            except FileNotFoundError:
                return  # no session has listed anything yet
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.unreadable += 1
                return
            self.reads += 1
            if self.seen and self.seen[-1] == entry:
                return
            if entry[1] < self.highest:
                self.problems.append(f"last.ckpt of episode {entry[1]} (generation {entry[0]}) listed after episode "
                                     f"{self.highest} (listings before it: {self.seen[-3:]})")  # fmt: skip
            if entry[0] == 0 < self.max_generation:
                self.problems.append(f"the mirror's manifest was written by a session without a lease (generation "
                                     f"0, last.ckpt {entry[1]}) after {self.seen[-3:]}")  # fmt: skip
            elif entry[0] < self.max_generation:  # a session's write landed after a later session's lease and write
                self.generation_went_back.append(f"generation {entry[0]} (last.ckpt {entry[1]}) listed after "
                                                 f"{self.seen[-3:]}")  # fmt: skip
            self.highest, self.max_generation = max(self.highest, entry[1]), max(self.max_generation, entry[0])
            self.seen.append(entry)

    def drain(self) -> tuple[list[str], list[str]]:
        """``problems`` and ``generation_went_back`` since the last drain."""
        with self._lock:
            drained = self.problems, self.generation_went_back
            self.problems, self.generation_went_back = [], []
        return drained

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Machine:
    """One trainer of a round: "machine" A or B, with its own run folder (kept from round to round, as a machine
    that comes back keeps its disk) and the round's one mirror; how it starts and when it is killed."""

    name: str
    folder: Path
    take_over: bool
    #: ("none",) | ("episode", n, delay_s) | ("aim", target, when, n) | ("rival", delay_s): see :func:`_kill_plan`.
    kill: tuple[Any, ...]
    cap: int  # --trainer.max_steps
    cap_past_rival: int = 0  # at launch, the cap rises by this much from the larger of it and the other's episode
    run: Watched | None = None
    launched_at: float = 0.0
    killed_how: str | None = None
    aimed: bool = False
    kill_due: float | None = None
    decided: bool = False  # it trains, or it has ended
    rival_trained_then: bool = False  # when it decided, the other one held the lease and trained on
    rival_episode_at_take_over: int | None = None

    def launch(self, mirror: str, every: int, rival: Machine) -> None:
        self.cap = max(self.cap, rival.run.reached if rival.run else 0) + self.cap_past_rival
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [*fit_command(self.folder, every, mirror, share=SYNC_SHARE), "--trainer.max_steps", str(self.cap)]
        self.run = Watched(command + (["--take_over", "true"] if self.take_over else []), (TAKEN_OVER_LINE,))
        self.run.every = every
        self.launched_at = time.monotonic()

    def alive(self) -> bool:
        return self.run is not None and self.run.process.poll() is None

    def training(self) -> bool:
        return self.run is not None and self.run.training_since is not None

    def killed(self) -> bool:
        return self.killed_how is not None or (self.run is not None and self.run.killed_at is not None)

    def start(self) -> int:
        assert self.run is not None
        return self.run.resumed_from or 0

    def output(self) -> str:
        return "".join(self.run.lines) if self.run else ""

    def tail(self) -> str:
        lines = [line for line in (self.run.lines if self.run else []) if not line.startswith("CHAOS ")]
        return "".join(lines[-8:])

    def sigkill(self, how: str) -> None:
        assert self.run is not None
        self.killed_how = how
        self.run.process.send_signal(signal.SIGKILL)

    def end(self) -> None:
        """Wait for the process (killed first if it still runs) and its output."""
        if self.run is not None:
            if self.alive():
                self.sigkill("timeout")
            self.run.wait(60)


@dataclass
class RoundPlan:
    order: str
    refused: bool  # no start of this round has --take_over: the later one must be refused
    quiet: bool  # nothing is killed before one trainer is superseded, refused or done
    second_after: tuple[str, float]  # ("episode", n): once the first trained n episodes; ("time", s): s after it
    machines: tuple[Machine, Machine]  # in launch order


def plan_round(rng: random.Random, number: int, workdir: Path, base: int) -> RoundPlan:
    """Round ``number``'s schedule, drawn from ``rng`` alone (the same seed gives the same schedule; only timing
    varies): the order cycles through :data:`ORDERS`; every fourth round from the first is quiet; every fourth from
    the third has no --take_over, and its kills wait until both starts are decided (a kill before would free the
    lease, a dead process's, and the refusal could not be judged). ``base`` is where the mirror's run stands."""
    order = ORDERS[number % len(ORDERS)]
    refused, quiet, at_once = number % 4 == 2, number % 4 == 0, order == "at_once"
    names = ("b", "a") if order == "b_then_a" else ("a", "b")
    if at_once:
        second_after = ("time", rng.uniform(0.0, 0.3))
    elif number % 2 == 0:  # the first trains, so it holds the lease, when the second starts
        second_after = ("episode", float(rng.randint(0, 30)))
    else:  # at a moment: the second may take the lease before the first does
        second_after = ("time", rng.uniform(0.0, 8.0))
    # Nothing but a take-over or a kill stops a first trainer of A-then-B or B-then-A (a long cap); at once, either
    # one may be superseded or refused, and without --take_over nobody is: both stop at a short cap.
    first_cap = base + rng.randint(60, 100) if refused or at_once else base + OPEN_CAP
    first_take_over = at_once and not refused and rng.random() < 0.5
    first_kill = ("none",) if quiet else _kill_plan(rng, rival=True)
    second_kill = ("none",) if quiet else _kill_plan(rng, rival=False)
    first = Machine(names[0], workdir / names[0], first_take_over, first_kill, first_cap)
    second = Machine(names[1], workdir / names[1], not refused, second_kill, base, rng.randint(60, 120))
    return RoundPlan(order, refused, quiet, second_after, (first, second))


def _kill_plan(rng: random.Random, rival: bool) -> tuple[Any, ...]:
    """When a trainer gets SIGKILL: ``n`` episodes into its session (plus up to half a second); at a traced write
    of the store once ``n`` episodes in; ``delay`` seconds after the other trainer was launched (``rival``: it lands
    anywhere in that one's start, its lease and its download included); or never (it ends by itself)."""
    kind = rng.choice(("episode", "aim", "rival", "none") if rival else ("episode", "aim", "none"))
    if kind == "episode":
        return kind, rng.randint(1, 50), rng.uniform(0.0, 0.5)
    if kind == "aim":
        return kind, rng.choice(AIMS), rng.choice(("before", "after")), rng.randint(1, 30)
    if kind == "rival":
        return kind, rng.uniform(0.0, 12.0)
    return (kind,)


def two_machines(workdir: Path, rounds: int, every: int = TWO_MACHINES_EVERY, seed: int = 0) -> TwoMachinesReport:
    """``rounds`` rounds of two trainers against one mirror (see the module's docstring), each checked after it."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    mirror = workdir / "mirror"
    report, orders = TwoMachinesReport(), Counter[str]()
    watcher = MirrorWatcher(mirror / "demo" / "checkpoints" / "MANIFEST.json")
    base = 0
    try:
        for number in range(rounds):
            plan = plan_round(rng, number, workdir, base)
            orders[plan.order] += 1
            newest_before = {machine.name: _newest_listed(machine.folder) for machine in plan.machines}
            try:
                if not _drive(plan, str(mirror), every):
                    report.failures.append(f"round {number}: the trainers still ran after {ROUND_TIMEOUT_S:.0f} s")
            finally:
                for machine in plan.machines:
                    machine.end()
            _judge_round(report, number, plan, newest_before)
            watcher.read_now()  # the trainers are gone: what the mirror lists now is recorded
            _check_round_listings(report, number, [mirror] + [machine.folder / "runs" for machine in plan.machines])
            base = _check_fresh_machine(report, number, workdir, str(mirror), every, watcher.highest)
            report.round_log.append(_round_line(number, plan, base))
            watcher.read_now()
            problems, generations = watcher.drain()
            report.failures += [f"round {number}: {problem}" for problem in problems]
            report.generation_went_back += [f"round {number}: {seen}" for seen in generations]
            report.rounds += 1
    finally:
        watcher.stop()
    report.orders = dict(orders)
    report.manifest_reads, report.unreadable_reads, report.listings_seen = (watcher.reads, watcher.unreadable,
                                                                            len(watcher.seen))  # fmt: skip
    report.max_generation = watcher.max_generation
    return report


def _round_line(number: int, plan: RoundPlan, base: int) -> str:
    """``3 b_then_a: b[episode 12] exit -9 at 52 (killed: episode); a[take_over, none] exit 0 at 140 (took over);
    the mirror at 140``"""
    ends = []
    for machine in plan.machines:
        if machine.run is None:
            ends.append(f"{machine.name} never started")
            continue
        flags = ", ".join(["take_over"] * machine.take_over + [" ".join(map(str, machine.kill[:2]))])
        out, how = machine.output(), machine.killed_how or ("aim" if machine.killed() else None)
        notes = [f"killed: {how}"] * (how is not None) + ["refused"] * (REFUSED_LINE in out)
        notes += ["took over"] * (TAKEN_OVER_LINE in out) + ["superseded"] * (SUPERSEDED_LINE in out)
        ends.append(f"{machine.name}[{flags}] exit {machine.run.process.returncode} at {machine.run.reached}"
                    + (f" ({', '.join(notes)})" if notes else ""))  # fmt: skip
    kind = " no take-over" if plan.refused else " quiet" if plan.quiet else ""
    return f"{number} {plan.order}{kind}: {'; '.join(ends)}; the mirror at {base}"


def _drive(plan: RoundPlan, mirror: str, every: int) -> bool:
    """Launch the round's trainers, the second when its moment comes, and kill each as its plan says; False when
    they still run after ``ROUND_TIMEOUT_S``."""
    first, second = plan.machines
    first.launch(mirror, every, second)
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while time.monotonic() < deadline:
        if second.run is None and _second_due(plan, first):
            second.launch(mirror, every, first)
        for machine, rival in ((first, second), (second, first)):
            if machine.run is not None:
                _note(machine, rival)
                _maybe_kill(machine, rival, hold=plan.refused, every=every)
        if second.run is not None and not first.alive() and not second.alive():
            return True
        time.sleep(0.02)
    return False


def _second_due(plan: RoundPlan, first: Machine) -> bool:
    kind, value = plan.second_after
    if not first.alive():
        return True
    if kind == "episode":
        return first.training() and first.run is not None and first.run.reached >= first.start() + value
    return time.monotonic() >= first.launched_at + value


def _note(machine: Machine, rival: Machine) -> None:
    """What the judgement needs to know of the moment ``machine`` decided (trains, or ended) and took over."""
    assert machine.run is not None
    if not machine.decided and (machine.training() or not machine.alive()):
        machine.decided = True
        # The other one held the lease and trained on (short of its cap, where it gives the lease back).
        machine.rival_trained_then = (rival.alive() and rival.training() and rival.run is not None
                                      and rival.run.reached < rival.cap)  # fmt: skip
    if TAKEN_OVER_LINE in machine.run.said and machine.rival_episode_at_take_over is None:
        machine.rival_episode_at_take_over = rival.run.reached if rival.run is not None else 0


def _maybe_kill(machine: Machine, rival: Machine, hold: bool, every: int) -> None:
    """SIGKILL ``machine`` when its plan says; with ``hold``, not before both starts are decided."""
    assert machine.run is not None
    if machine.killed() or not machine.alive() or machine.kill[0] == "none":
        return
    if hold and not (machine.decided and rival.decided):
        return
    kind, now = machine.kill[0], time.monotonic()
    if kind == "rival":
        if rival.run is not None and now >= rival.launched_at + machine.kill[1]:
            machine.sigkill(kind)
    elif kind == "episode":
        if machine.kill_due is None and machine.training() and machine.run.reached >= machine.start() + machine.kill[1]:
            machine.kill_due = now + machine.kill[2]
        if machine.kill_due is not None and now >= machine.kill_due:
            machine.sigkill(kind)
    elif machine.training() and not machine.aimed:
        machine.aimed = True
        machine.run.aim(machine.kill[1], machine.kill[2], after_episode=machine.start() + machine.kill[3])
    elif machine.aimed and machine.run.reached >= machine.start() + machine.kill[3] + 3 * every:
        machine.sigkill("aim-missed")  # a superseded trainer uploads nothing: the write aimed at may never come


def _newest_listed(folder: Path) -> int:
    """The newest episode the run folder's manifest lists, counting a pending entry whose file landed (a write a kill
    interrupted after its file, before its manifest): the next start settles it before it asks for the lease, so a
    start that is then refused has trained nothing even though its manifest lists a newer episode."""
    checkpoints = folder / "runs" / "demo" / "checkpoints"
    try:
        manifest = json.loads((checkpoints / "MANIFEST.json").read_text())
        entries = list(manifest["files"].values())
        entries += [entry for name, entry in manifest.get("pending", {}).items() if _landed(checkpoints / name, entry)]
        return max((entry["episode"] for entry in entries), default=-1)
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _landed(path: Path, entry: dict[str, Any]) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    except (OSError, KeyError):  # no file, or an entry without its hash: not landed (the rest still counts)
        return False


def _judge_round(report: TwoMachinesReport, number: int, plan: RoundPlan, newest_before: dict[str, int]) -> None:
    first, second = plan.machines
    if second.run is None:
        report.failures.append(f"round {number} ({plan.order}): {second.name} never started: {first.tail()}")
        return
    for machine, rival in ((first, second), (second, first)):
        _judge_trainer(report, f"round {number} ({plan.order}) {machine.name}", machine, rival,
                       newest_before[machine.name])  # fmt: skip
    # Neither with --take_over, and one trained while the other held the lease and trained on: the later start
    # should have been refused.
    if (first.training() and second.training() and not (first.take_over or second.take_over)
            and (first.rival_trained_then or second.rival_trained_then)):  # fmt: skip
        report.failures.append(f"round {number} ({plan.order}): both trained at once, neither with --take_over")
    if all(REFUSED_LINE in machine.output() for machine in plan.machines):
        report.failures.append(f"round {number} ({plan.order}): both starts were refused")


def _judge_trainer(report: TwoMachinesReport, where: str, machine: Machine, rival: Machine, newest_before: int) -> None:
    """One trainer's end: its exit code, and what it says against what the other one did."""
    assert machine.run is not None and rival.run is not None
    code, out = machine.run.process.returncode, machine.output()
    report.exit_codes[str(code)] = report.exit_codes.get(str(code), 0) + 1
    if code not in (0, 5, -signal.SIGKILL):
        report.failures.append(f"{where}: exit {code}: {machine.tail()}")
    if machine.killed():
        how = machine.killed_how or "aim"
        report.kills += 1
        report.kills_by_plan[how] = report.kills_by_plan.get(how, 0) + 1
    elif code == -signal.SIGKILL:
        report.failures.append(f"{where}: killed, but not by this script: {machine.tail()}")
    report.finished_exits += code == 0
    if REFUSED_LINE in out:
        report.refusals += 1
        if code != 5 and not (code == -signal.SIGKILL and machine.killed()):  # a kill may land as it ends
            report.failures.append(f"{where}: refused, but exit {code}")
        if machine.training() or _newest_listed(machine.folder) > newest_before:
            report.failures.append(f"{where}: refused, but it trained: {machine.tail()}")
    elif code == 5:
        if SUPERSEDED_LINE not in out:
            report.failures.append(f"{where}: exit 5, neither refused nor taken over: {machine.tail()}")
        report.superseded_exits += SUPERSEDED_LINE in out
        if not rival.take_over:
            report.failures.append(f"{where}: superseded by {rival.name}, a start without --take_over")
    if TAKEN_OVER_LINE in out:
        report.take_overs += 1
        if not machine.take_over:
            report.failures.append(f"{where}: took the mirror over without --take_over")
        # The one taken over from held its lease then; it stops superseded (5), unless killed or done at its cap.
        if rival.run.process.returncode == 0 and rival.run.reached < rival.cap:
            report.failures.append(f"{where}: took over from {rival.name}, which still ended with exit 0: "
                                   f"{rival.tail()}")  # fmt: skip
        if SUPERSEDED_LINE in rival.output() and machine.rival_episode_at_take_over is not None:
            # Trained after the take-over (from its resume point, when it had not trained yet then).
            after = rival.run.reached - max(machine.rival_episode_at_take_over, rival.start())
            report.most_episodes_after_take_over = max(report.most_episodes_after_take_over, after)


def _listing(folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The entries of ``folder``'s manifest whose files verify, each the pending entry where the file matches that
    one (a kill in the middle of a replacement, as a start settles it), and the listed files that match neither."""
    path = folder / "MANIFEST.json"
    if not path.exists():
        return {}, []
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        return {}, [f"{path} does not parse ({err})"]
    files, pending = data["files"], data.get("pending", {})
    verified, problems = {}, []
    for name in sorted(set(files) | set(pending)):
        entry = next((e for e in (pending.get(name), files.get(name)) if e and _verifies(folder / name, e)), None)
        if entry is not None:
            verified[name] = entry
        elif name in files:  # a pending file alone may be an upload the kill stopped: nothing listed it yet
            problems.append(f"{folder / name} matches neither its entry nor a pending one")
    return verified, problems


def _check_round_listings(report: TwoMachinesReport, number: int, runs: list[Path]) -> None:
    """The mirror's manifest and both machines' local ones parse, and each file they list verifies."""
    for root in runs:
        verified, problems = _listing(root / "demo" / "checkpoints")
        report.files_verified += len(verified)
        report.failures += [f"round {number}: {problem}" for problem in problems]


def _check_fresh_machine(
    report: TwoMachinesReport, number: int, workdir: Path, mirror: str, every: int, seen: int
) -> int:
    """A new machine (an empty run folder, the same mirror, no --take_over: the trainers' processes are gone) must
    resume from the newest checkpoint the mirror lists, and that one from the newest ``last.ckpt`` the watcher ever
    saw listed (``seen``): nothing listed was lost. Its total is that episode, so it stops at once ("run finished").
    Returns where the run stands for the next round."""
    verified, _ = _listing(Path(mirror) / "demo" / "checkpoints")
    expected = max((entry["episode"] for entry in verified.values()), default=-1)
    if expected < seen:
        report.failures.append(f"round {number}: the mirror listed last.ckpt of episode {seen}; now its newest "
                               f"verified checkpoint is of episode {expected}")  # fmt: skip
    if expected <= 0:
        return 0  # nothing to resume from: the next round starts the run anew
    folder = workdir / f"fresh-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    run = Watched(fit_command(folder, every, mirror, total=expected, share=SYNC_SHARE))
    try:
        code = run.wait(300)
    except subprocess.TimeoutExpired:
        run.kill()
        code = None
    finished = next((match for line in run.lines if (match := FINISHED_LINE.search(line))), None)
    resumed = run.resumed_from if run.resumed_from is not None else int(finished.group(1)) if finished else None
    if code != 0 or resumed != expected:
        tail = "".join([line for line in run.lines if not line.startswith("CHAOS ")][-8:])
        report.failures.append(f"round {number}: a fresh machine resumed from episode {resumed} (exit {code}); "
                               f"the mirror lists episode {expected}: {tail}")  # fmt: skip
    else:
        report.fresh_resumes += 1
        report.resumed_from_pending += expected > seen  # listed as pending by a killed sync, settled by the start
    report.max_episode = max(report.max_episode, expected)
    shutil.rmtree(folder, ignore_errors=True)
    return expected


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    every = f"SmartCheckpoint.every_n_episodes (default 10; {TWO_MACHINES_EVERY} with --two-machines)"
    parser.add_argument("--every", type=int, default=None, help=every)
    parser.add_argument("--episodes", type=int, default=STORM_EPISODES, help="the storm run's total episodes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/atheria-soak"))
    parser.add_argument("--no-mirror", action="store_true", help="storm without a mirror")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak-rounds", type=int, default=0,
                        help="then this many SIGTERM rounds with corruption and mirror outages")  # fmt: skip
    parser.add_argument("--two-machines", type=int, default=0, metavar="ROUNDS",
                        help="instead of the storm: this many rounds of two trainers on one mirror")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    if args.two_machines:
        rounds = two_machines(args.workdir / "two-machines", args.two_machines, args.every or TWO_MACHINES_EVERY,
                              args.seed)  # fmt: skip
        print(json.dumps({"two_machines": asdict(rounds), "seconds": round(time.monotonic() - started, 1)}), flush=True)
        return 1 if rounds.failures else 0
    args.every = args.every or 10
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
