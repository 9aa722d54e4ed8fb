"""Pretrained presets offline: HF_HUB_OFFLINE fails at once, without a
connection; an unreachable hub fails after one short probe, not the client's retries.

Each case runs in a fresh interpreter with empty weight caches, so nothing cached
on this machine hides the behaviour; a local server that accepts connections and
never answers stands in for a hub behind a dead network.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

BUILD = """
import sys
from trainer.models import build_model, model_preset
try:
    build_model(model_preset(sys.argv[1]))
except RuntimeError as exc:
    print("ERROR", exc)
    sys.exit(3)
print("BUILT")
"""


class SilentServer:
    """Accepts TCP connections and never sends a byte; counts the connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self._held:
            c.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def build_in_subprocess(preset: str, tmp_path: Path, server: SilentServer, **env_extra
                        ) -> subprocess.CompletedProcess:
    endpoint = f"http://127.0.0.1:{server.port}"
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
        "HF_ENDPOINT": endpoint,
        # every other route out goes to the silent server too
        "HTTP_PROXY": endpoint, "HTTPS_PROXY": endpoint, "http_proxy": endpoint,
        "https_proxy": endpoint, "NO_PROXY": "", "no_proxy": "",
        **env_extra,
    }
    return subprocess.run([sys.executable, "-c", BUILD, preset], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("preset, what", [("earthloc2-dinov2-s", "vit_small_patch14_reg4_dinov2"),
                                          ("r18-cosplace512", "resnet18")])
def test_hf_hub_offline_fails_at_once_without_a_connection(preset, what, tmp_path,
                                                            silent_server):
    r = build_in_subprocess(preset, tmp_path, silent_server, HF_HUB_OFFLINE="1")
    assert r.returncode == 3, r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stdout and what in r.stdout
    assert "pretrained: null" in r.stdout                   # says what to do instead
    assert silent_server.connections == 0                   # not one connection was tried


@pytest.mark.parametrize("preset", ["earthloc2-dinov2-s", "r18-cosplace512"])
def test_an_unreachable_hub_fails_after_one_short_probe(preset, tmp_path, silent_server):
    r = build_in_subprocess(preset, tmp_path, silent_server, STREAMLOC_HUB_TIMEOUT="0.5")
    assert r.returncode == 3, r.stderr
    assert "could not be reached within 0.5 s" in r.stdout
    assert "HF_HUB_OFFLINE=1" in r.stdout
    assert silent_server.connections == 1                   # one probe, no retries


def test_hub_timeout_must_be_a_number(monkeypatch):
    from trainer.models.weights import hub_timeout
    monkeypatch.setenv("STREAMLOC_HUB_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="STREAMLOC_HUB_TIMEOUT"):
        hub_timeout()
    monkeypatch.setenv("STREAMLOC_HUB_TIMEOUT", "2.5")
    assert hub_timeout() == 2.5
