"""Shared test fixtures: a small LLaMA-architecture model and LlamaScope-layout SAEs,
built once per test session in a temporary folder (no weights are committed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("ENGINE_NO_PROGRESS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "browser: drives Debian's chromium with Playwright")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """DIR with model/, saes/ and config.yaml from scripts/make_fixtures.py (defaults)."""
    from engine.fixtures import make_fixtures

    return make_fixtures(tmp_path_factory.mktemp("fixtures"), n_layers=6, d_model=64, d_sae=512, seed=0)


@pytest.fixture
def fixture_config(fixture_dir, tmp_path):
    """The fixture config with a fresh cache folder per test."""
    from engine.config import load_config

    return load_config(fixture_dir / "config.yaml", {"cache_dir": str(tmp_path / "cache")})


@pytest.fixture(scope="session")
def fixture_model(fixture_dir):
    """(model, tokenizer) loaded once, float32 on CPU."""
    from engine.config import load_config
    from engine.model import load_model, load_tokenizer

    cfg = load_config(fixture_dir / "config.yaml")
    return load_model(cfg.model, "cpu"), load_tokenizer(cfg.model)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache holding the shortened demo (engine.demo.build_quick_demo: model, SAEs, experiment
    files and the pipeline's artifacts), built once per session; its config is
    <cache>/demo/config.yaml. ENGINE_TEST_DEMO_CACHE=DIR reuses a finished one."""
    from engine.demo import build_quick_demo, is_demo_complete

    reuse = os.environ.get("ENGINE_TEST_DEMO_CACHE")  # a prebuilt quick demo, to iterate on tests faster
    if reuse and is_demo_complete(Path(reuse)):
        return Path(reuse).resolve()
    cache = tmp_path_factory.mktemp("demo_cache")
    build_quick_demo(cache)
    return cache
