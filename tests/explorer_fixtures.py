"""Fixtures and helpers for the explorer's tests (import the fixtures into a test module)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cache_factory import make_cache, write_manifest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A schema-valid small cache and the config it was made with (read-only: copy to modify)."""
    from engine.config import load_config

    root = tmp_path_factory.mktemp("explorer")
    config = root / "config.yaml"
    config.write_text("cache_dir: cache\n")
    cfg = load_config(config)
    info = make_cache(root / "cache", "small", seed=0, cfg=cfg)
    return SimpleNamespace(root=root, config=config, cache=root / "cache", cfg=cfg, info=info)


@pytest.fixture
def cache_copy(small_cache, tmp_path):
    """A private copy of the small cache, with its own config."""
    from engine import schema
    from engine.config import load_config

    shutil.copytree(small_cache.cache, tmp_path / "cache")
    config = tmp_path / "config.yaml"
    config.write_text("cache_dir: cache\n")
    steps = list(json.loads((tmp_path / "cache" / schema.MANIFEST).read_text())["steps"])
    write_manifest(tmp_path / "cache", steps, load_config(config))  # fingerprints hold absolute paths
    return SimpleNamespace(root=tmp_path, config=config, cache=tmp_path / "cache", info=small_cache.info)


def app_test(monkeypatch, config: Path, cache: Path, page: str | None = None, timeout: float = 30, **params):
    """An AppTest of app.py (switched to `page`) reading `cache`, as `streamlit run app.py -- ...`."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py", "--config", str(config), "--cache", str(cache)])
    at = AppTest.from_file(APP, default_timeout=timeout)
    if page:
        at.switch_page(page)
    for k, v in params.items():
        at.query_params[k] = v
    return at


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def plotly_specs(at) -> list[dict]:
    """The figures on the page as plain JSON (plotly's base64 typed arrays decoded to lists)."""
    return [_decode(json.loads(el.proto.spec)) for el in at.get("plotly_chart")]


def _decode(obj):
    import base64

    import numpy as np

    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"])
            if "shape" in obj:
                arr = arr.reshape([int(x) for x in str(obj["shape"]).split(",")])
            return arr.tolist()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def texts(at, kind: str) -> list[str]:
    return [str(e.value) for e in getattr(at, kind)]


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())
