"""Autocast bookkeeping for the rollout: the weight cast cache, and the autocast state a recompute re-enters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast_state(devices: tuple[str, ...] = ("cpu", "cuda")) -> list[tuple[str, torch.dtype, bool]]:
    """The autocast contexts in force on ``devices``: device type, dtype and weight cache (to enter them again)."""
    cache = torch.is_autocast_cache_enabled()
    try:
        return [
            (device, torch.get_autocast_dtype(device), cache) for device in devices if torch.is_autocast_enabled(device)
        ]
    except (AttributeError, TypeError):  # torch < 2.4 asks no device type
        old = {"cpu": (torch.is_autocast_cpu_enabled, torch.get_autocast_cpu_dtype),
               "cuda": (torch.is_autocast_enabled, torch.get_autocast_gpu_dtype)}  # fmt: skip
        return [(device, old[device][1](), cache) for device in devices if device in old and old[device][0]()]


@contextlib.contextmanager
def weight_cast_cache(device_type: str) -> Iterator[None]:
    """Under mixed precision, cast each weight to the low precision once per rollout, not once per step.

    Lightning's mixed-precision plugin runs the training step under ``torch.autocast(..., cache_enabled=False)``.
    Without autocast's cache every step casts every weight again and keeps that copy for the backward pass, so a
    rollout held one low-precision copy of the weights per step ("GPU, measured on one NVIDIA H100" in
    ``benchmarks/RESULTS.md``). Inside such a context this enters autocast again, with the same dtype and the cache
    on; the copies are the same numbers, and the cache is emptied when the outermost autocast context ends.
    Elsewhere (no autocast, or its cache already on) it does nothing.
    """
    dtype = next((dtype for _, dtype, cache in autocast_state((device_type,)) if not cache), None)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, cache_enabled=True):
        yield
