"""What compressing the standard model's checkpoints would save and cost: JSON lines, one per file and method.

Issue 18, point 5: old ``best-*`` files would be stored compressed on the mirror only if they shrink by at least
20% at under 1 s each. This measures that on checkpoints written by the project itself: ``atheria fit`` on
``configs/colab_free.yaml`` (the Colab and Kaggle presets' model: UNET, d_state 8, hidden 64, about 84 MB a file:
7.0 M float32 weights and AdamW's two moment buffers), made cheap on a CPU by a small grid and few steps per
episode, which change neither the parameter count nor the file's structure. Two runs: one of a single episode (its
``best-e000001.ckpt``: weights next to their initial values, AdamW moments after one step) and one of
``--episodes`` episodes (its oldest kept ``best-*`` file and its ``last.ckpt``). ``--files`` measures given
checkpoints instead (a real run's, copied from the mirror).

Methods, each on the whole file's bytes, one thread: zstd (``zstandard``) at a few levels; the standard library's
zlib and lzma for reference; blosc2 with a byte or bit shuffle of 4-byte items before zstd (float32 tensors compress
poorly byte by byte: the shuffle puts the exponent bytes together); and the torch archive re-written by ``zipfile``
with its entries deflated, the nearest thing to a torch option (``torch.save`` has none: it writes every entry
stored, uncompressed; ``torch.load`` still reads the deflated archive). Each row gives the compressed size, and the
least wall and process CPU time of ``--repeats`` compressions and decompressions; every round trip is checked (the
same bytes, or for the re-zipped archive the same tensors). ``loadavg`` is the machine's 1-minute load when the row
started: the development machine is shared.

A last row per method (``"summary": true``) applies the issue's rule over every file measured: it passes when every
file shrinks by at least 20% and compresses in under 1 s of wall time.

Usage, from the repository root (blosc2 and zstandard are optional: a method whose module is missing is skipped)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compression.py --episodes 200 --repeats 3
    PYTHONPATH=. .venv/bin/python benchmarks/bench_compression.py --files best-e000420.ckpt,last.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import lzma
import os
import platform
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_speed import device_name  # benchmarks/ is this script's folder, first on sys.path

from atheria_lightning.cli import main as atheria

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "colab_free.yaml"
#: The issue's rule: a method pays when every file shrinks by at least this share ...
MIN_SAVED = 0.20
#: ... in under this many seconds of wall time per file.
MAX_COMPRESS_S = 1.0
#: Overrides that make the preset cheap on a CPU without changing its model: the grid and steps per episode set no
#: parameter of a convolutional net. Precision 32: the CPU has no fp16; the weights and moments are float32 anyway.
CHEAP = [
    "--mirror_url", "null", "--resume", "never", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
    "--trainer.enable_progress_bar", "false", "--model.grid_size", "8", "--model.qca_steps", "3",
]  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    level: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]
    #: False when the round trip gives other bytes that load to the same tensors (the re-zipped archive).
    byte_identical: bool = True


def methods(only: set[str] | None, zstd_levels: list[int]) -> list[Method]:
    """Every method whose module is installed (``only``: those names)."""
    found = [
        *(Method("zlib", str(level), lambda data, level=level: zlib.compress(data, level), zlib.decompress)
          for level in (1, 6)),
        Method("lzma", "preset 1", lambda data: lzma.compress(data, preset=1), lzma.decompress),
        Method("torch-zip-deflate", "1", rezip_deflated, rezip_stored, byte_identical=False),
    ]  # fmt: skip
    zstd = optional("zstandard")
    if zstd is not None:
        found += [
            Method("zstd", str(level), zstd.ZstdCompressor(level=level).compress, zstd.ZstdDecompressor().decompress)
            for level in zstd_levels
        ]
    blosc2 = optional("blosc2")
    if blosc2 is not None:
        shuffle, bitshuffle, bytedelta = blosc2.Filter.SHUFFLE, blosc2.Filter.BITSHUFFLE, blosc2.Filter.BYTEDELTA
        for label, filters in (("shuffle", [shuffle]), ("bitshuffle", [bitshuffle]),
                               ("shuffle+bytedelta", [shuffle, bytedelta])):  # fmt: skip
            for level in (1, 5):
                compress, decompress = blosc2_codec(blosc2, filters, level)
                found.append(Method(f"blosc2-{label}-zstd", str(level), compress, decompress))
    return [method for method in found if only is None or method.name in only]


def optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        print(f"{module} is not installed: its rows are skipped", file=sys.stderr)
        return None


def blosc2_codec(blosc2: Any, filters: list[Any], level: int) -> tuple[Callable[[bytes], bytes], ...]:
    # typesize 4: the tensors are float32, stored at 64-byte aligned offsets in the archive, so 4-byte items of the
    # whole file are the floats themselves.
    def compress(data: bytes) -> bytes:
        return bytes(blosc2.compress2(data, typesize=4, clevel=level, codec=blosc2.Codec.ZSTD, filters=filters,
                                      filters_meta=[0] * len(filters), nthreads=1))  # fmt: skip

    def decompress(data: bytes) -> bytes:
        return bytes(blosc2.decompress2(data, nthreads=1))

    return compress, decompress


def rezip(data: bytes, compression: int, level: int | None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", compression, compresslevel=level) as to:
        for info in source.infolist():
            to.writestr(info.filename, source.read(info))
    return out.getvalue()


def rezip_deflated(data: bytes) -> bytes:
    return rezip(data, zipfile.ZIP_DEFLATED, 1)


def rezip_stored(data: bytes) -> bytes:
    return rezip(data, zipfile.ZIP_STORED, None)


def same_tensors(original: bytes, other: bytes) -> bool:
    """Whether two torch archives load (``weights_only``) to the same checkpoint, tensor for tensor."""
    return equal(*(torch.load(io.BytesIO(data), weights_only=True) for data in (original, other)))


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN equals NaN here: the same bytes loaded twice


def timed(function: Callable[[bytes], bytes], data: bytes, repeats: int) -> tuple[bytes, float, float]:
    """``function(data)`` and its least wall and process CPU seconds over ``repeats`` calls."""
    walls, cpus, result = [], [], b""
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(data)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, min(walls), min(cpus)


def describe(path: Path) -> dict[str, Any]:
    """What the checkpoint holds: its model settings, parameter count, episode and AdamW moments (our own file)."""
    checkpoint = torch.load(path, weights_only=True)
    model = checkpoint["hyper_parameters"]
    moments = [state[key] for state in checkpoint["optimizer_states"][0]["state"].values()
               for key in ("exp_avg", "exp_avg_sq")]  # fmt: skip
    nonzero = sum(int(torch.count_nonzero(t)) for t in moments) / max(1, sum(t.numel() for t in moments))
    return {
        "architecture": model.get("architecture"), "d_state": model.get("d_state"),
        "hidden": model.get("hidden_channels"), "params": sum(t.numel() for t in checkpoint["state_dict"].values()),
        "global_step": checkpoint.get("global_step"), "adamw_moments_nonzero": round(nonzero, 4),
    }  # fmt: skip


def train(folder: Path, episodes: int, val_every: int) -> Path:
    """``atheria fit --config configs/colab_free.yaml`` made cheap; returns the run's checkpoints folder."""
    args = ["fit", "--config", str(PRESET), "--run_root", str(folder), *CHEAP,
            "--data.total_episodes", str(episodes), "--data.val_every_episodes", str(val_every)]  # fmt: skip
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = atheria(args)
    if code != 0:
        raise SystemExit(f"atheria fit exited with {code}: {' '.join(args)}")
    return folder / "colab_free" / "checkpoints"


def produce(folder: Path, episodes: int) -> list[tuple[str, Path]]:
    """Checkpoints written by the project: after 1 episode, and the oldest best and the last of a longer run."""
    first = train(folder / "one", 1, 1)
    longer = train(folder / "long", episodes, 10)
    oldest_best = sorted(longer.glob("best-e*.ckpt"))[0]
    return [
        ("after 1 episode", first / "best-e000001.ckpt"),
        (f"oldest best kept of {episodes} episodes", oldest_best),
        (f"last of {episodes} episodes", longer / "last.ckpt"),
    ]


def measure(files: list[tuple[str, Path]], chosen: list[Method], repeats: int) -> list[dict[str, Any]]:
    head = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "python": platform.python_version()}
    for module in ("zstandard", "blosc2"):
        with contextlib.suppress(ImportError):
            head[module] = importlib.import_module(module).__version__
    rows = []
    for label, path in files:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        about = {"file": path.name, "what": label, **describe(path), "original_bytes": len(data)}
        for method in chosen:
            load = os.getloadavg()[0]
            packed, compress_wall, compress_cpu = timed(method.compress, data, repeats)
            restored, decompress_wall, decompress_cpu = timed(method.decompress, packed, repeats)
            if method.byte_identical:
                intact = hashlib.sha256(restored).hexdigest() == digest
            else:
                intact = same_tensors(data, packed)
            if not intact:
                raise SystemExit(f"{method.name} {method.level}: the round trip of {path.name} lost data")
            saved = 1 - len(packed) / len(data)
            row = {**head, **about, "method": method.name, "level": method.level, "compressed_bytes": len(packed),
                   "size_pct": round(100 * len(packed) / len(data), 2), "saved_pct": round(100 * saved, 2),
                   "compress_wall_s": round(compress_wall, 4), "compress_cpu_s": round(compress_cpu, 4),
                   "decompress_wall_s": round(decompress_wall, 4), "decompress_cpu_s": round(decompress_cpu, 4),
                   "repeats": repeats, "round_trip": "same bytes" if method.byte_identical else "same tensors",
                   "loadavg": round(load, 2),
                   "passes": saved >= MIN_SAVED and compress_wall < MAX_COMPRESS_S}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    for method in chosen:
        mine = [row for row in rows if (row["method"], row["level"]) == (method.name, method.level)]
        print(json.dumps({**head, "summary": True, "method": method.name, "level": method.level,
                          "files": len(mine), "least_saved_pct": min(row["saved_pct"] for row in mine),
                          "most_compress_wall_s": max(row["compress_wall_s"] for row in mine),
                          "most_compress_cpu_s": max(row["compress_cpu_s"] for row in mine),
                          "rule": f"saved >= {MIN_SAVED:.0%} and compress < {MAX_COMPRESS_S:g} s on every file",
                          "passes": all(row["passes"] for row in mine)}))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="episodes of the longer training run")
    parser.add_argument("--files", default="", help="measure these checkpoints (comma-separated) instead of training")
    parser.add_argument("--repeats", type=int, default=3, help="compressions and decompressions per row (least time)")
    parser.add_argument("--methods", default="", help="only these methods (comma-separated names), e.g. zstd,zlib")
    parser.add_argument("--zstd-levels", default="1,3,9", help="zstd levels (19 takes about 30 s a file)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = {name for name in args.methods.split(",") if name} or None
    chosen = methods(only, [int(level) for level in args.zstd_levels.split(",")])
    if args.files:
        paths = [Path(name) for name in args.files.split(",")]
        measure([(path.name, path) for path in paths], chosen, args.repeats)
        return 0
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(produce(Path(folder), args.episodes), chosen, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
