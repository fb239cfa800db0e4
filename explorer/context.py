"""Which config and cache the explorer shows, and the commands that fill a cache.

The app is started as `streamlit run app.py -- --config FILE --cache DIR` (what
`python -m engine explore` runs). Without `--config` it reads `./config.yaml` (or the
repository's), without `--cache` the config's `cache_dir`. The sidebar can switch the
cache for one browser session.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.config import Config, load_config
from engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class AppContext:
    config_path: str | None
    cache: Path
    cfg: Config = field(compare=False, hash=False)
    config_error: str | None = None

    @property
    def default_cache(self) -> Path:
        return Path(self.cfg.cache_dir).resolve()


def parse_app_args(argv: list[str]) -> tuple[str | None, str | None]:
    """(config, cache) from the arguments after `--` of `streamlit run app.py -- ...`."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=None)
    p.add_argument("--cache", default=None)
    args, _ = p.parse_known_args(argv)
    return args.config, args.cache


def default_config_path(config: str | None) -> str | None:
    if config:
        return str(Path(config).expanduser().resolve())
    for candidate in (Path.cwd() / "config.yaml", ROOT / "config.yaml"):
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def _stamp(path: str | None) -> int:
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return 0


@lru_cache(maxsize=8)
def _load(config_path: str | None, stamp: int) -> tuple[Config, str | None]:
    try:
        return load_config(config_path), None
    except UserError as exc:
        # A broken config still lets the app show the cache, with the reason on the home page.
        return load_config(None), str(exc)


def build_context(config: str | None, cache: str | None) -> AppContext:
    path = default_config_path(config)
    cfg, error = _load(path, _stamp(path))
    folder = Path(cache).expanduser().resolve() if cache else Path(cfg.cache_dir).expanduser().resolve()
    return AppContext(path, folder, cfg, error)


def engine_command(ctx: AppContext, step: str, *extra: str) -> str:
    """The command line that (re)builds a step's output in this cache."""
    parts = ["python", "-m", "engine", step]
    if ctx.config_path:
        parts += ["--config", _short(ctx.config_path)]
    if ctx.cache != ctx.default_cache:
        parts += ["--cache", _short(str(ctx.cache))]
    parts += list(extra)
    return " ".join(shlex.quote(p) for p in parts)


def _short(path: str) -> str:
    """Paths under the working directory are shown relative to it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path
