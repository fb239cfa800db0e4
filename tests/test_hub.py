"""engine/hub.py: the hub probe against real local sockets, and the loaders' switch to the cache."""

from __future__ import annotations

import socket

import pytest

from engine import hub
from engine.config import ModelConfig
from engine.errors import UserError


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return port


def test_probe_sees_a_listening_endpoint(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable() is True
        assert hub.local_only(False) is False and hub.local_only(True) is True
    finally:
        server.close()


def test_probe_sees_a_closed_endpoint_and_the_offline_switch(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert hub.hub_reachable() is False and hub.local_only(False) is True
    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("must not probe when offline"))
    assert hub.hub_reachable() is False


def test_unreachable_hub_fails_at_once_with_one_sentence(monkeypatch, tmp_path):
    from engine.model import load_config_only
    from engine.sae import load_sae
    from engine.config import SAEConfig

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(UserError) as err:
        load_config_only(ModelConfig(name_or_path="meta-llama/Llama-3.1-8B", local_files_only=False))
    assert "not in the local Hugging Face cache" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="Llama3_1-8B-Base-L3R-8x/hyperparams.json"):
        load_sae(SAEConfig(source="fnlp/Llama3_1-8B-Base-LXR-8x", local_files_only=False), 3)
