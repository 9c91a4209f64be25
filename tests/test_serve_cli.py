"""`expertmap serve`: user mistakes are one line and exit 2; a real start on loopback answers and stops on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expertmap(*args, timeout=120):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "expertmap.cluster.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "0"], "must be at least 1"),
        (["--budget", "7"], "out of range"),
        (["--policy", "psychic"], "unknown policy"),
        (["--config", "nope.yaml"], "does not exist"),
        (["--model", "/nonexistent"], "does not exist"),
        (["--port", "0"], "--port"),
        (["--config", "configs/serve-six-gpu.yaml", "--policy", "psychic"], "unknown policy"),
    ],
)
def test_serve_mistakes_are_one_line(args, needle):
    r = expertmap("serve", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertmap: error: ") and needle in lines[0], r.stderr


@pytest.mark.timeout(300)
def test_serve_starts_answers_and_stops_on_sigint():
    """`--gpus 2`: a two-stage pipeline on two declared GPUs behind the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "expertmap.cluster.cli", "serve", "--config", "configs/serve.yaml", "--gpus", "2",
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("expertmap serve did not come up")
        r = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "expertmap-moe-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        assert r.json()["expertmap"]["gpus"] == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        assert f"{url}/v1" in out and "curl" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
