"""Shared fixtures: the bundled model, and a real redis-server on a free loopback port."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from expertmap.actors.defaults import BUNDLED_MODELS

logging.getLogger("transformers").setLevel(logging.ERROR)


@dataclass
class BundledModel:
    folder: Path
    tokenizer: object
    top_k: int
    total_experts: int

    @property
    def smallest_budget(self) -> float:
        return self.top_k / self.total_experts + 1e-9


def load_bundled(name: str) -> BundledModel:
    from transformers import AutoConfig, AutoTokenizer

    folder = BUNDLED_MODELS[name]
    assert (folder / "model.safetensors").exists(), f"bundled model {name} missing at {folder}"
    cfg = AutoConfig.from_pretrained(folder)
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    return BundledModel(folder, AutoTokenizer.from_pretrained(folder), cfg.num_experts_per_tok, experts * cfg.num_hidden_layers)


@pytest.fixture(scope="session")
def bundled_model() -> BundledModel:
    """The default bundled model (16 experts, top-2)."""
    return load_bundled("expertmap-moe-tiny")


@pytest.fixture(scope="session", params=sorted(BUNDLED_MODELS))
def each_bundled_model(request) -> BundledModel:
    """Every bundled model in turn: the 16-expert one and the fine-grained 64-expert one."""
    return load_bundled(request.param)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- a real redis-server ---------------------------------------------------------------------


class RedisServer:
    """A redis-server child process on 127.0.0.1:``port`` with AOF persistence in ``dir``.

    ``stop()`` and ``start()`` restart it on the same port and directory, so tests can check that
    data survives a restart.
    """

    def __init__(self, executable: str, directory: Path, port: int):
        self.executable = executable
        self.dir = directory
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running (pid {self.proc.pid})")
        args = [
            self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", "redis.log",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not _redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_file = self.dir / "redis.log"
                log_tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no log)"
                self.stop()
                pytest.fail(f"redis-server did not answer PING on 127.0.0.1:{self.port} in {timeout_s}s:\n{log_tail}")
            time.sleep(0.02)

    def stop(self, graceful: bool = True) -> None:
        """Stop the server: SIGTERM (Redis flushes and exits) or, with ``graceful=False``, SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
            else:
                self.proc.kill()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed (not on PATH): `apt-get install -y redis-server` or `make redis`")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"), _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
