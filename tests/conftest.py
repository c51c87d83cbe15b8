"""Shared helpers: tiny CLI runs of the real presets, in temporary folders."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from atheria_lightning.callbacks import time_guard
from atheria_lightning.testing import EpisodeClock as FakeEpisodeClock  # noqa: F401 (re-exported to the tests)

# Tiny models on 2 cores: intra-op threads only contend (a grid-8 forward took ~1 s with 2 threads on a loaded
# machine, ~1 ms with one).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: Overrides that shrink the demo preset to a few seconds on 2 CPU cores.
TINY = [
    "--model.architecture", "UNET", "--model.d_state", "2", "--model.hidden_channels", "4", "--model.grid_size", "8",
    "--model.qca_steps", "3", "--model.universes_per_episode", "1", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--order", default="file", metavar="file|reverse|shuffle:SEED",
                     help="run the collected tests in file order (default), reversed, or shuffled with SEED: "
                     "no test may depend on what ran before it")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:") and order[len("shuffle:") :].isdigit():
        random.Random(int(order[len("shuffle:") :])).shuffle(items)
    elif order != "file":
        raise pytest.UsageError(f"--order={order!r}: use file, reverse or shuffle:SEED (a whole number)")


#: The guard's own reading of the session's age, for the tests marked ``real_process_age``.
REAL_PROCESS_AGE = time_guard.process_age_seconds


@pytest.fixture(autouse=True, scope="session")
def _a_fresh_session() -> Iterator[None]:
    """Every guard counts the session from its own construction, not from the pytest process's start.

    ``TimeLimitGuard`` counts the budget from the start of the process (in a notebook the kernel's age is the
    session's), so an in-process fit late in a long suite would find the demo's 0.25 h spent. Session-scoped, so
    that module-scoped fixtures that train get it too. A test that needs the real process age says so with
    ``@pytest.mark.real_process_age``; subprocess fits have their own age.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time_guard, "process_age_seconds", lambda: 0.0)
        yield


@pytest.fixture(autouse=True)
def _the_real_process_age_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("real_process_age") is not None:
        monkeypatch.setattr(time_guard, "process_age_seconds", REAL_PROCESS_AGE)


@pytest.fixture(autouse=True)
def _quiet_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Runs must never write into the repository (./runs) when a test forgets --run_root.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    for var in ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "ATHERIA_KAGGLE_INPUT"):
        monkeypatch.delenv(var, raising=False)


def demo_args(tmp_path: Path, *extra: str, episodes: int = 6, val_every: int = 3, mirror: bool = True) -> list[str]:
    """``fit`` on the demo preset, shrunk, with its run and mirror folders under ``tmp_path``."""
    mirror_url = str(tmp_path / "mirror") if mirror else "null"
    return [
        "fit", "--config", str(CONFIGS / "demo.yaml"), "--run_root", str(tmp_path / "runs"),
        "--mirror_url", mirror_url, "--data.total_episodes", str(episodes),
        "--data.val_every_episodes", str(val_every), *TINY, *extra,
    ]  # fmt: skip


def callbacks_config(
    tmp_path: Path,
    guard_hours: float = 0.25,
    every: int = 10,
    sync: int = 20,
    monitor_every: int = 40,
    backoff_s: float = 1.0,
    top_k: int = 5,
) -> str:
    """A second ``--config`` file replacing the demo's callback list, with the given settings."""
    path = tmp_path / "callbacks.yaml"
    path.write_text(f"""trainer:
  callbacks:
    - class_path: atheria_lightning.callbacks.TimeLimitGuard
      init_args: {{max_hours: {guard_hours}}}
    - class_path: atheria_lightning.callbacks.SmartCheckpoint
      init_args: {{top_k: {top_k}, every_n_episodes: {every}}}
    - class_path: atheria_lightning.callbacks.MirrorSync
      init_args: {{every_n_episodes: {sync}, backoff_s: {backoff_s}}}
    - class_path: atheria_lightning.callbacks.ResourceMonitor
      init_args: {{every_n_episodes: {monitor_every}}}
""")
    return str(path)


def run_dir(tmp_path: Path, experiment: str = "demo") -> Path:
    return tmp_path / "runs" / experiment


def env_without_warnings() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def plain_state(state: dict) -> dict:
    """A callback's state with its tensors as lists, so that two states compare with ==."""
    return apply_to_collection(state, torch.Tensor, torch.Tensor.tolist)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def listed_last_episode(checkpoints: Path) -> int | None:
    """The episode of ``last.ckpt`` when ``checkpoints/MANIFEST.json`` lists it and the file verifies against that
    entry; None otherwise (no manifest yet, only a pending entry, a replacement under way)."""
    try:
        entry = json.loads((checkpoints / "MANIFEST.json").read_text())["files"]["last.ckpt"]
        data = (checkpoints / "last.ckpt").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return None
    return entry["episode"]


def wait_for_first_checkpoint(run: Path, timeout: float = 240, episode: int = 1) -> Path:
    """Wait until ``<run>/checkpoints/MANIFEST.json`` lists a verified ``last.ckpt`` of at least ``episode``;
    returns the manifest's path. A kill test waits for this state, never for a file to exist."""
    manifest = run / "checkpoints" / "MANIFEST.json"
    if not wait_for(lambda: (listed_last_episode(manifest.parent) or -1) >= episode, timeout):
        raise AssertionError(f"no verified last.ckpt of episode >= {episode} in {manifest.parent} within {timeout} s")
    return manifest


def make_read_only(root: Path) -> None:
    """chmod a-w, as Kaggle mounts its inputs (root ignores the modes: :func:`snapshot` is the real check)."""
    for folder, _, names in os.walk(root):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def snapshot(root: Path, leave_out: Path | None = None) -> dict[str, Any]:
    """Every path under ``root`` (but ``leave_out``) with its kind, mode, size, mtime and content hash."""
    seen: dict[str, Any] = {}
    for folder, folders, names in os.walk(root):
        folders[:] = [name for name in folders if Path(folder) / name != leave_out]
        for name in folders + names:
            path = Path(folder) / name
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            seen[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_mode, info.st_size,
                                                 info.st_mtime_ns, digest)  # fmt: skip
    return seen


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 protocol peer on 127.0.0.1 (moto's server), reached by the real s3fs client."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    endpoint = f"http://{host}:{port}"
    import s3fs

    # moto keeps its buckets in this process, whatever server serves them: each test starts from none.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("atheria-runs")
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


class LocalServer:
    """An HTTP server on 127.0.0.1, port chosen by the system, serving ``handler`` in a thread until :meth:`close`;
    ``url`` is ``<scheme>://127.0.0.1:<port>/<path>``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], scheme: str, path: str = "") -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/{path}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Sink(LocalServer):
    """A local HTTP server that keeps what apprise's ``json://`` service posts to it: path, title, message, type."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append({"path": self.path, **body})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler, "json")


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.close()
