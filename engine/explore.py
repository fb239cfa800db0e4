"""`python -m engine explore`: the README's main command.

When no experiment data is configured it first makes sure the embedded demo exists
(building it on first use), then starts `streamlit run app.py` bound to localhost.
The engine never imports streamlit: the app runs in its own process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.config import Config
from engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="address to bind (default app.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default app.port)")
    p.add_argument("--no-demo", action="store_true", help="never build the demo; show whatever the cache holds")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command instead of running it")


def data_configured(cfg: Config) -> bool:
    return bool(cfg.data.checkpoints_dir or cfg.data.responses_dir)


def streamlit_command(config_path: str | None, cache: Path, host: str, port: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--",
        "--cache", str(cache),
    ]
    if config_path:
        cmd += ["--config", str(config_path)]
    return cmd


def ensure_demo_or_preview(cfg: Config) -> tuple[str | None, Path]:
    """Build the demo (engine.demo) if it is missing; returns (config path, cache folder)."""
    try:
        demo = importlib.import_module("engine.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "engine.demo":
            raise
        demo = None
    if demo is not None and hasattr(demo, "ensure_demo"):
        return demo.ensure_demo(cfg)
    return _fixture_preview(cfg)


def _fixture_preview(cfg: Config) -> tuple[str, Path]:
    """Until the demo exists: a fixture model, its SAEs and one prototype in the cache."""
    from engine.config import load_config
    from engine.fixtures import make_fixtures
    from engine.prototype import run_prototype
    from engine.schema import FeatureId, atomic_write_json, prototype_path

    folder = cfg.cache / "demo" / "fixture"
    if not (folder / "config.yaml").is_file():
        print(f"building fixture model and SAEs in {folder} ...", file=sys.stderr)
        make_fixtures(folder)
    fcfg = load_config(folder / "config.yaml", {"cache_dir": str(cfg.cache)})
    feature = FeatureId(3, 0)
    out = prototype_path(cfg.cache, feature)
    if not out.is_file():
        atomic_write_json(out, run_prototype(fcfg, feature, dict(fcfg.prompts)))
        print(f"wrote {out}", file=sys.stderr)
    return str(folder / "config.yaml"), cfg.cache


def main(args: argparse.Namespace, cfg: Config) -> int:
    host = args.host or cfg.app.host
    port = args.port or cfg.app.port
    config_path, cache = cfg.source_path, cfg.cache
    if not data_configured(cfg) and not args.no_demo:
        config_path, cache = ensure_demo_or_preview(cfg)
    cmd = streamlit_command(config_path, Path(cache), host, port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {host}: the explorer will be reachable from other machines", file=sys.stderr)
    print(f"starting the explorer on http://{host}:{port}", file=sys.stderr)
    try:
        os.execv(sys.executable, cmd)
    except OSError as exc:
        raise UserError(f"cannot start streamlit: {exc}") from None
    return 0
