"""How a checkpoint reaches the run's ``checkpoints/``: serialised on the training thread, held for its proof or
queued at once, written by one writer thread one state at a time, journalled in ``MANIFEST.json`` before its rename
and listed after it, then retention; each listing and removal is told to the mirror's queue."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_utilities.core.apply_func import apply_to_collection

from atheria_lightning.files import MeasuredWriter, atomic_write, copy_measured, verify
from atheria_lightning.store import retention
from atheria_lightning.store.manifest import (
    LAST,
    MANIFEST_NAME,
    Entry,
    LocalSide,
    Manifest,
    is_checkpoint_name,
    kind_of,
    write_manifest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Save:
    """One save asked for: the file it becomes, the episode and metric it records, and whether it waits for its
    proof (:meth:`Writer.confirm`). It travels with Lightning's save to the store's ``CheckpointIO``."""

    name: str
    episode: int
    metric: float | None
    hold: bool = False

    def meta(self, monitor: str | None) -> dict[str, Any]:
        """What the checkpoint itself records of this save, under :data:`META_KEY`."""
        return {"episode": self.episode, "metric": self.metric, "monitor": monitor}


def checkpoint_path(checkpoint_dir: str, name: str) -> str:
    """Where checkpoint ``name`` lives; ``ValueError`` for any name the run store does not write."""
    if name != MANIFEST_NAME and not is_checkpoint_name(name):
        raise ValueError(f"{name!r} is not a checkpoint name of the run store")
    return os.path.join(checkpoint_dir, name)


class Folder:
    """The run's ``checkpoints/`` and its ``MANIFEST.json`` as this process keeps them, the only writer of both.

    Made by the start's repair (:func:`~atheria_lightning.store.reconcile.open_folder`), so its manifest is always
    there. Every listing and removal is also passed to ``send`` (the mirror's queue; a no-op without one).
    """

    def __init__(self, checkpoint_dir: str, manifest: Manifest, send: Callable[[str, Entry | None], None]) -> None:
        self.dir = checkpoint_dir
        self.side = LocalSide(checkpoint_dir)
        self.send = send
        self._manifest = manifest
        self._lock = threading.Lock()  # the manifest, between the training thread and the writer thread
        self._queued_best: dict[str, float] = {}  # best files asked for and not yet listed: name -> metric
        self._local = LocalFileSystem()

    def path(self, name: str) -> str:
        return checkpoint_path(self.dir, name)

    def matches(self, name: str, entry: Entry) -> bool:
        return verify(self._local, self.path(name), entry.size, entry.sha256)

    def copy(self) -> Manifest:
        with self._lock:
            manifest = self._manifest
            return Manifest(dict(manifest.files), dict(manifest.pending), manifest.updated)

    def entries(self) -> dict[str, Entry]:
        return dict(self.copy().files)

    def expect_best(self, name: str, metric: float | None) -> None:
        """``name`` is on its way: :meth:`kept_metrics` counts it until it is listed."""
        with self._lock:
            self._queued_best[name] = metric if metric is not None else math.inf

    def kept_metrics(self) -> list[float | None]:
        """The metrics of the best files listed and of those on their way."""
        with self._lock:
            files = dict(self._manifest.files)
            queued = [value for name, value in self._queued_best.items() if name not in files]
        return [entry.metric for name, entry in files.items() if name != LAST] + queued

    def journal(self, name: str, entry: Entry) -> None:
        with self._lock:
            self._manifest.pending[name] = entry
        self.write_manifest()

    def list(self, name: str, entry: Entry, send: bool = True) -> None:
        with self._lock:
            self._manifest.files[name] = entry
            self._manifest.pending.pop(name, None)
            self._queued_best.pop(name, None)
        self.write_manifest()
        if send:
            self.send(name, entry)

    def unlist(self, names: list[str]) -> bool:
        """Take ``names`` off the manifest (written at once); whether any was listed."""
        with self._lock:
            removed = [self._manifest.files.pop(name, None) is not None for name in names]
        if any(removed):
            self.write_manifest()
        return any(removed)

    def remove(self, name: str) -> None:
        # Unlist first, then delete: a crash in between leaves an unlisted file, which the next start adopts.
        if not self.unlist([name]):
            return
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass
        self.send(name, None)

    def quarantine(self, name: str) -> None:
        with self._lock:
            self._manifest.files.pop(name, None)
        self.write_manifest()
        self.side.quarantine(name)

    def write_manifest(self) -> None:
        write_manifest(self.side, self.copy())


class Writer:
    """The writer thread of a run's checkpoints, and the one serialized state that waits for its proof.

    Args:
        folder: The folder it writes into.
        async_write: Write in a background thread (else at once, on the caller's thread).
        top_k: How many best files retention keeps (asked at each write: the setting may come later).
    """

    def __init__(self, folder: Folder, async_write: bool, top_k: Callable[[], int]) -> None:
        self.folder = folder
        self.async_write = async_write
        self.top_k = top_k
        self.max_write_seconds = 0.0
        self._lock = threading.Lock()  # the list of futures
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._held: tuple[Save, memoryview] | None = None
        self._state_write: Future | None = None  # the newest serialized state queued for writing
        last = folder.entries().get(LAST)
        self._last_queued = last.episode if last is not None else None  # the newest last.ckpt written or on its way

    # -- the training thread --
    def queue(self, save: Save, checkpoint: dict[str, Any]) -> None:
        """Serialize ``checkpoint`` now, then hold it for :meth:`confirm` or queue its write."""
        data = serialized(checkpoint)
        if save.hold:
            self._held = (save, data)
        else:
            self._submit_state(save, data)

    def confirm(self, sound: bool) -> None:
        """Decide a held save: written when ``sound`` (the next episode's loss was finite), else dropped."""
        if self._held is None:
            return
        save, data = self._held
        self._held = None
        if sound:
            self._submit_state(save, data)
            return
        log.warning("the state of episode %d led to a non-finite loss: not saved; last.ckpt keeps episode %s",
                    save.episode, self._last_queued if self._last_queued is not None else "none")  # fmt: skip

    def copy_last(self, target: str, episode: int, metric: float) -> None:
        """Queue a copy of the ``last.ckpt`` of ``episode`` (just queued) as ``target``."""
        self.folder.expect_best(target, metric)
        self._submit(self._copy, LAST, target, episode, metric)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout``) for the queued writes; True when every one is on disk and listed."""
        with self._lock:
            futures = [future for future in self._futures if not future.done()]
        done, not_done = wait(futures, timeout=timeout)
        return not not_done

    def raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit_state(self, save: Save, data: memoryview) -> None:
        """Queue a serialized state's write, once the previous one is written: a disk slower than training then
        slows training, instead of letting unwritten states pile up in memory (and in what a kill would lose)."""
        if self._state_write is not None:
            self._state_write.result()
        self._state_write = self._submit(self._write, save, data)
        if save.name == LAST:
            self._last_queued = save.episode

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future | None:
        """Run ``fn`` in the writer thread, after what is queued (at once, on this thread, without async_write)."""
        self.raise_pending_error()
        if not self.async_write:
            fn(*args)
            self.raise_pending_error()
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atheria-store")
        future = self._executor.submit(fn, *args)
        with self._lock:
            self._futures = [queued for queued in self._futures if not queued.done()]
            self._futures.append(future)
        return future

    # -- the writer thread --
    def _write(self, save: Save, data: memoryview) -> None:
        self._guarded(self._write_file, save.name, lambda handle: handle.write(data), save.episode, save.metric)

    def _copy(self, source: str, target: str, episode: int, metric: float) -> None:
        entry = self.folder.copy().files.get(source)
        if entry is None or entry.episode != episode:
            self._fail(FileNotFoundError(f"cannot keep {target}: {source} of episode {episode} is not listed"))
            return

        def produce(handle: IO[bytes]) -> None:
            with open(self.folder.path(source), "rb") as original:
                if not copy_measured(original, handle).matches(entry.size, entry.sha256):
                    raise OSError(f"{self.folder.path(source)} no longer matches MANIFEST.json: not copied to {target}")

        self._guarded(self._write_file, target, produce, episode, metric)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            return  # an earlier write failed: keep everything as it is until the error surfaces
        try:
            fn(*args)
        except BaseException as err:  # surfaced on the training thread at the next save, flush or teardown
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        log.error("checkpoint write failed, earlier checkpoints are kept: %s", err)
        self._error = err

    def _write_file(self, name: str, produce: Callable[[IO[bytes]], None], episode: int, metric: float | None) -> None:
        """Write ``name`` atomically: journalled as pending before its rename, listed after it, then retention."""
        started = time.monotonic()
        measured: dict[str, Any] = {}

        def write(handle: IO[bytes]) -> None:
            measured["file"] = MeasuredWriter(handle)
            produce(measured["file"])  # type: ignore[arg-type]

        def journal(tmp: str) -> None:
            written = measured["file"]
            if os.path.getsize(tmp) != written.size:
                raise OSError(f"{tmp} holds {os.path.getsize(tmp)} bytes after {written.size} were written")
            measured["entry"] = Entry(episode, written.size, written.hexdigest(), metric, kind_of(name), time.time())
            self.folder.journal(name, measured["entry"])

        atomic_write(self.folder.side.fs, self.folder.path(name), write, before_replace=journal)
        # A best file goes to the mirror's queue after the removal it causes: a sync never sees top_k + 1 of them
        # and takes the one pushed out for a surplus to set aside.
        self.folder.list(name, measured["entry"], send=name == LAST)
        self.max_write_seconds = max(self.max_write_seconds, time.monotonic() - started)
        if name != LAST:
            self._retain()
            if name in self.folder.entries():  # unless retention took it at once
                self.folder.send(name, measured["entry"])

    def _retain(self) -> None:
        """Remove the best files beyond ``top_k`` (listed ones only: they are unlisted first, then deleted)."""
        for name in retention.beyond_top_k(self.folder.copy().files, self.top_k()):
            self.folder.remove(name)


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    # The file holds CPU tensors, so that any machine can load it without a map_location; a CPU tensor is not copied.
    return tensor.detach().cpu()


def serialized(checkpoint: dict[str, Any]) -> memoryview:
    """``checkpoint`` as the bytes ``torch.save`` writes, with every tensor on the CPU.

    The bytes are the point-in-time copy of the state: training may change the tensors as soon as this returns.
    Pickling holds Python's interpreter lock, so it is done here, on the caller's thread, and the writer thread
    only writes, hashes and fsyncs, which release it (HISTORY.md, "plot process, checkpoint serialization").
    """
    buffer = BytesIO()
    torch.save(apply_to_collection(checkpoint, torch.Tensor, _on_cpu), buffer)
    return buffer.getbuffer()
