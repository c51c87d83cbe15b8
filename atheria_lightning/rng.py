"""The process's random-number states (torch CPU and CUDA, numpy, Python ``random``) as plain values and tensors.

Checkpoints are loaded with ``weights_only=True`` (they may come from a shared Drive or bucket), which refuses numpy
arrays and other objects: numpy's and Python's states are kept as int64 tensors beside plain ints, floats and
strings. Only public APIs are used (``torch.get_rng_state``, ``numpy.random.get_state``, ``random.getstate``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["restore_rng_states", "rng_states"]


def rng_states() -> dict[str, Any]:
    """The global generators' states: ``torch``, ``numpy``, ``python`` and, once CUDA is initialized, ``cuda`` (one
    state per device)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, state, gauss_next = random.getstate()
    numpy = {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
             "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}  # fmt: skip
    python = {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
              "gauss_next": None if gauss_next is None else float(gauss_next)}  # fmt: skip
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy, "python": python}
    # Reading a CUDA state initializes CUDA (a context on every device, and no fork afterwards): before that no
    # CUDA random number was drawn: the CUDA generators are still where the session seeded them.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`rng_states`); all of them or, when one is malformed,
    none (``ValueError``). CUDA states are set on the devices this machine has, and skipped without CUDA."""
    torch_state, numpy_state, python_state, cuda = _checked(states)
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _checked(states: Mapping[str, Any]) -> tuple[torch.Tensor, tuple, tuple, list[torch.Tensor]]:
    """The states as the generators take them; ``ValueError`` naming what is malformed."""
    try:
        numpy, python = states["numpy"], states["python"]
        torch_state, keys, state = states["torch"], numpy["keys"], python["state"]
        cuda = list(states.get("cuda") or [])
        if not all(isinstance(tensor, torch.Tensor) for tensor in [torch_state, keys, state, *cuda]):
            raise TypeError("a state that should be a tensor is not one")
        if not all(device.dtype == torch.uint8 and device.dim() == 1 for device in cuda):
            raise TypeError("a CUDA state is not a 1-D byte tensor")
        numpy_state = (numpy["algorithm"], keys.numpy().astype(np.uint32), int(numpy["pos"]),
                       int(numpy["has_gauss"]), float(numpy["cached_gaussian"]))  # fmt: skip
        gauss = python["gauss_next"]
        python_state = (int(python["version"]), tuple(state.tolist()), None if gauss is None else float(gauss))
        # Set nothing until every state is known to be taken: a half-restored process would be worse than none.
        np.random.RandomState().set_state(numpy_state)
        random.Random().setstate(python_state)
        torch.Generator().set_state(torch_state)
    except (LookupError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"malformed random-number states: {type(err).__name__}: {err}") from err
    return torch_state, numpy_state, python_state, cuda
