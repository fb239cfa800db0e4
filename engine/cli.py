"""`python -m engine <step> --config FILE [--cache DIR] [--device cpu|cuda] ...`

Each step lives in its own module exposing `add_arguments(parser)` and
`main(args, cfg) -> int`; modules are imported only when their command runs (the
parser imports them too, so they keep torch imports inside functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from engine.errors import UserError, write_traceback

# name, module, one-line help
COMMANDS: list[tuple[str, str, str]] = [
    ("audit", "engine.audit", "step 0: audit every checkpoint file and response log"),
    ("select", "engine.select", "step 1: select the top causal features per layer"),
    ("prototype", "engine.prototype", "step 2: single-feature prototype (activations and upstream candidates)"),
    ("pathways", "engine.pathways", "step 3: gradient attribution + replay validation pathway graphs"),
    ("tokens", "engine.tokens", "step 4: token associations (logit lens, input tokens, behavioural words)"),
    ("intervene", "engine.intervene",
     "clamp or ablate features and sample decisions on the safe and risky prompts against the unpatched model"),
    ("integrate", "engine.integrate", "step 5: integrate all results into one table, union graph and report"),
    ("run", "engine.orchestrator", "run steps 0-5 in order, skipping steps whose inputs have not changed"),
    ("status", "engine.status", "print each step's status, time and peak memory from the manifest"),
    ("demo", "engine.demo", "build the embedded demo (model, SAEs, experiment data) and run the pipeline on it"),
    ("explore", "engine.explore", "start the Streamlit explorer (building the demo first when nothing is configured)"),
]

DEFAULT_CONFIG = "config.yaml"


def _available_commands() -> list[tuple[str, object, str]]:
    out = []
    for name, modname, help_ in COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # step not built in this checkout
            raise
        if hasattr(mod, "add_arguments") and hasattr(mod, "main"):
            out.append((name, mod, help_))
    return out


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", default=None, help=f"config YAML (default: ./{DEFAULT_CONFIG} if present)")
    g.add_argument("--cache", default=None, help="cache folder (overrides cache_dir)")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="overrides model.device")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set pathways.n_replay=10 (repeatable)")
    g.add_argument("--progress-file", default=None, help="also write progress as JSON to this file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="<step>")
    for name, mod, help_ in _available_commands():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_common_arguments(sp)
        mod.add_arguments(sp)
        sp.set_defaults(_module=mod)
    return p


def config_from_args(args: argparse.Namespace):
    from engine.config import load_config, parse_set_arguments

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    overrides = parse_set_arguments(getattr(args, "set", []))
    cfg = load_config(path, overrides)
    if getattr(args, "cache", None):
        cfg.cache_dir = str(Path(args.cache).expanduser().resolve())
    if getattr(args, "device", None):
        cfg.model.device = args.device
    return cfg


#: The running command and its cache folder, for the internal-error traceback file.
_RUN = {"command": "engine", "cache": None}


def main(argv: list[str] | None = None) -> int:
    _RUN.update(command="engine", cache=None)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from engine import progress

    progress.set_progress_file(args.progress_file)
    _RUN["command"] = args.command
    cfg = config_from_args(args)
    _RUN["cache"] = cfg.cache
    try:
        rc = int(args._module.main(args, cfg) or 0)
    except BaseException:
        progress.report(args.command, state="failed", message=_current_error_line())
        raise
    progress.report(args.command, state="complete" if rc == 0 else "failed")
    return rc


def _current_error_line() -> str:
    exc = sys.exc_info()[1]
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


def run_main(fn: Callable[..., int], *fn_args) -> int:
    """Run `fn`, turning errors into one line on stderr and an exit code."""
    try:
        return int(fn(*fn_args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug: keep the traceback in a file, show one line
        if os.environ.get("ENGINE_DEBUG") == "1":
            raise
        log = write_traceback(traceback.format_exc(), _RUN["cache"], str(_RUN["command"]))
        where = f"; traceback in {log}" if log else ""
        print(f"internal error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return 1


def entry() -> int:
    return run_main(main)
