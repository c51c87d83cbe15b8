"""The run store: the one owner of a run folder's checkpoints, ``MANIFEST.json``, retention, mirror and choices.

Callbacks decide *when* (episode cadence, validation, time budget, signals); the store does *how*:

- the facade the callbacks and the CLI call: :mod:`~atheria_lightning.store.run_store` (:class:`RunStore`, and
  :class:`StoreCheckpointIO`, the plugin Lightning's saves reach);
- every checkpoint write (atomic, hashed while written, journalled in ``MANIFEST.json`` before its rename, in a
  background thread): :mod:`~atheria_lightning.store.writer`;
- every read or write of a ``MANIFEST.json``, local or mirrored, and the rules of its entries:
  :mod:`~atheria_lightning.store.manifest`, the only module that touches one;
- retention (:mod:`~atheria_lightning.store.retention`): ``last.ckpt`` plus the ``top_k`` best files by their
  metric, decided from the manifest itself, so it holds across kills, resumes and a changed folder;
- the mirror (:mod:`~atheria_lightning.store.mirror`): each write tells its queue what to send; a sync
  (:mod:`~atheria_lightning.store.uploader`) sends what is queued, writes the mirror's manifest, then removes what
  retention dropped; a flush waits for that with a bound; every mirror operation retries through one policy
  (:mod:`~atheria_lightning.store.retry`);
- the mirror's lease (:mod:`~atheria_lightning.store.lease`): one session owns a run's mirror at a time; a later
  one that takes it over supersedes it, and the mirror never goes backwards;
- the start of every session (:mod:`~atheria_lightning.store.reconcile`): a damaged manifest is rebuilt from the
  files, the mirror and the local folder are compared, what the mirror has newer is downloaded (verified, through
  :mod:`~atheria_lightning.store.copies`), what it lacks is queued for upload;
- the choices: the checkpoint to resume from (newest) and the one to export or hand to the next phase (best).
"""

from typing import TYPE_CHECKING, Any

from atheria_lightning.store.lease import MirrorInUse
from atheria_lightning.store.manifest import META_KEY, Entry, best_name, is_checkpoint_name, unsound
from atheria_lightning.store.mirror import MirrorStatus, check_mirror_url, remote_run_dir

if TYPE_CHECKING:
    from atheria_lightning.store.run_store import Checkpoint, RunStore, StoreCheckpointIO, UsesRunStore
    from atheria_lightning.store.writer import serialized

# The writing side needs torch and Lightning; the reading side (manifests, retention, the mirror's listing) does
# not, and `atheria status` imports only that: the writing side's names are imported when first asked for.
_WRITING = {name: "run_store" for name in ("Checkpoint", "RunStore", "StoreCheckpointIO", "UsesRunStore")}
_WRITING["serialized"] = "writer"


def __getattr__(name: str) -> Any:
    if name not in _WRITING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WRITING[name]}"), name)


__all__ = [
    "META_KEY",
    "Checkpoint",
    "Entry",
    "MirrorInUse",
    "MirrorStatus",
    "RunStore",
    "StoreCheckpointIO",
    "UsesRunStore",
    "best_name",
    "check_mirror_url",
    "is_checkpoint_name",
    "remote_run_dir",
    "serialized",
    "unsound",
]
