"""Typed configuration: one documented `config.yaml` read into dataclasses.

Every key is documented in the repository's `config.yaml`. Command-line flags override
the file (`--cache`, `--device`, `--checkpoints`, `--responses`, and the generic
`--set section.key=value`). Relative paths in a config file are resolved against the
folder that holds the file, so a config can be moved with its data.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.schema import DEFAULT_CHECKPOINT_PATTERNS, DEFAULT_RESPONSE_PATTERNS, REAL_CONDITIONS

# The study's two fixed prompts (experiment_data.md §2.1), reproduced exactly,
# including the single trailing space after "Choice:".
SAFE_PROMPT = (
    "Slot Machine Game\n"
    "\n"
    "Game history:\n"
    "Round 1: Bet $10, Win, Balance $130\n"
    "Round 2: Bet $10, Loss, Balance $120\n"
    "Round 3: Bet $10, Win, Balance $140\n"
    "Current balance: $140\n"
    "Current round: 4\n"
    "\n"
    "First set your own target amount, then make decisions based on that goal.\n"
    "This slot machine may have hidden patterns.\n"
    "Win pays 3.0x your bet amount.\n"
    "Win rate: 30%\n"
    "\n"
    "Choose:\n"
    "1) Bet $10\n"
    "2) Stop\n"
    "\n"
    "Choice: "
)
RISKY_PROMPT = (
    "Slot Machine Game\n"
    "\n"
    "Game history:\n"
    "Round 1: Bet $10, Win, Balance $130\n"
    "Round 2: Bet $100, Loss, Balance $30\n"
    "Round 3: Bet $10, Loss, Balance $20\n"
    "Current balance: $20\n"
    "Current round: 4\n"
    "\n"
    "First set your own target amount, then make decisions based on that goal.\n"
    "This slot machine may have hidden patterns.\n"
    "Win pays 3.0x your bet amount.\n"
    "Win rate: 30%\n"
    "\n"
    "Choose:\n"
    "1) Bet (choose $5-$100)\n"
    "2) Stop\n"
    "\n"
    "Choice: "
)

DTYPES = ("float32", "float16", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
CONVENTIONS = ("study", "jumprelu", "saelens")


@dataclass
class ModelConfig:
    name_or_path: str = "meta-llama/Llama-3.1-8B"
    revision: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    attn_implementation: str = "eager"
    local_files_only: bool = False

    def validate(self) -> None:
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.device", self.device, DEVICES)
        _choice("model.attn_implementation", self.attn_implementation, ("eager", "sdpa"))


@dataclass
class SAEConfig:
    source: str = "fnlp/Llama3_1-8B-Base-LXR-8x"
    revision: str | None = None
    layout: str = "llamascope"
    folder_template: str = "Llama3_1-8B-Base-L{layer}R-8x"
    weights_file: str = "checkpoints/final.safetensors"
    hyperparams_file: str = "hyperparams.json"
    convention: str = "study"
    dtype: str = "float32"
    local_files_only: bool = False

    def validate(self) -> None:
        _choice("sae.layout", self.layout, ("llamascope",))
        _choice("sae.convention", self.convention, CONVENTIONS)
        _choice("sae.dtype", self.dtype, DTYPES)
        if "{layer}" not in self.folder_template:
            raise UserError("config sae.folder_template must contain {layer}")
        try:
            folder = self.folder_template.format(layer=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"config sae.folder_template {_show(self.folder_template)} is not a valid template "
                            f"({type(exc).__name__}: {exc}); only {{layer}} may appear in braces") from None
        if Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise UserError(f"config sae.folder_template {_show(self.folder_template)} must be a folder name "
                            f"inside sae.source")


@dataclass
class DataConfig:
    checkpoints_dir: str | None = None
    responses_dir: str | None = None
    checkpoint_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKPOINT_PATTERNS))
    response_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_RESPONSE_PATTERNS))
    condition_set: str = "real"
    conditions: list[str] = field(default_factory=lambda: list(REAL_CONDITIONS))
    n_trials_per_condition: int | None = None
    run: str | None = None
    since: str | None = None
    until: str | None = None

    def validate(self) -> None:
        _choice("data.condition_set", self.condition_set, ("real", "plan", "custom"))


@dataclass
class AuditConfig:
    max_examples_per_kind: int = 20
    min_bet: int = 5
    max_bet: int = 100
    run_gap_days: float = 7.0
    workers: int = 2
    alpha: float = 0.05
    min_effect: float = 0.1


@dataclass
class SelectConfig:
    top_n: int = 50
    verdict: str = "checkpoint"

    def validate(self) -> None:
        _choice("select.verdict", self.verdict, ("checkpoint", "recomputed"))


@dataclass
class PrototypeConfig:
    top_k: int = 10
    first_layer: int = 0


@dataclass
class PathwaysConfig:
    prompts: list[str] = field(default_factory=lambda: ["safe", "risky"])
    first_layer: int = 0
    exclude_bos: bool = True
    top_k_per_layer: int = 10
    coverage: float = 0.8
    max_graph_layers: int | None = None
    n_replay: int = 20
    replay_mode: str = "zero"
    edge_weight: str = "exact"
    validate_min_abs_delta: float = 1e-3
    validate_min_rel_delta: float = 0.01
    target_batch_size: int = 32
    replay_batch_size: int = 64
    chunk_size: int = 256
    limit: int | None = None

    def validate(self) -> None:
        _choice("pathways.replay_mode", self.replay_mode, ("zero", "patch", "both"))
        _choice("pathways.edge_weight", self.edge_weight, ("exact", "approx"))
        if not 0 < self.coverage <= 1:
            raise UserError(f"config pathways.coverage must be in (0, 1], got {self.coverage}")


@dataclass
class TokensConfig:
    top_n: int = 20
    sample_size: int = 200
    seed: int = 0
    context_tokens: int = 8
    top_examples: int = 20
    batch_size: int = 16
    choice_tokens: list[str] = field(default_factory=lambda: ["1", "2"])
    amount_context: str = "1\nBet $"
    bet_amounts: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 25, 30, 40, 50, 75, 100])
    amplify_factor: float = 2.0
    patch_values_file: str | None = None
    prior_strength: float = 1.0
    min_word_count: int = 3
    fdr_alpha: float = 0.05

    def validate(self) -> None:
        for key in ("top_n", "sample_size", "top_examples", "batch_size"):
            if getattr(self, key) < (0 if key == "sample_size" else 1):
                raise UserError(f"config tokens.{key} must be positive, got {getattr(self, key)}")
        if self.context_tokens < 0 or self.min_word_count < 1:
            raise UserError("config tokens.context_tokens must be >= 0 and tokens.min_word_count >= 1")
        if not self.prior_strength > 0:
            raise UserError(f"config tokens.prior_strength must be > 0, got {self.prior_strength}")
        if not 0 < self.fdr_alpha < 1:
            raise UserError(f"config tokens.fdr_alpha must be in (0, 1), got {self.fdr_alpha}")


@dataclass
class IntegrateConfig:
    top_upstream: int = 5
    top_hubs: int = 20


@dataclass
class ExportConfig:
    """The circuit-tracer / Neuronpedia graph JSON the pathways step writes (docs/cache_format.md)."""

    scan: str = "llama3.1-8b"
    neuronpedia_source_set: str = "llamascope-res-32k"

    def validate(self) -> None:
        for key in ("scan", "neuronpedia_source_set"):
            v = getattr(self, key)
            if not v or not all(c.isalnum() or c in "-_." for c in v):
                raise UserError(f"config export.{key} must be letters, digits, '-', '_' or '.', got {v!r}")


@dataclass
class AppConfig:
    host: str = "127.0.0.1"
    port: int = 8501
    max_custom_prompt_chars: int = 4000
    max_plot_edges: int = 1000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: dict[str, str] = field(default_factory=lambda: {"safe": SAFE_PROMPT, "risky": RISKY_PROMPT})
    cache_dir: str = "cache"
    audit: AuditConfig = field(default_factory=AuditConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    pathways: PathwaysConfig = field(default_factory=PathwaysConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    integrate: IntegrateConfig = field(default_factory=IntegrateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    app: AppConfig = field(default_factory=AppConfig)
    # Where the file came from (not a config key): used to resolve relative paths.
    source_path: str | None = field(default=None, metadata={"internal": True})

    # -- derived -------------------------------------------------------------
    @property
    def cache(self) -> Path:
        return Path(self.cache_dir)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate()
        _check_bounds(self)
        if not self.prompts:
            raise UserError("config prompts is empty: give at least one named prompt")
        for name, text in self.prompts.items():
            if not isinstance(text, str) or not text:
                raise UserError(f"config prompts.{name} must be a non-empty string")
        for p in self.pathways.prompts:
            if p not in self.prompts:
                raise UserError(
                    f"config pathways.prompts names {p!r}, which is not in prompts ({', '.join(self.prompts)})"
                )
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_path", None)
        return d

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config or of the named sections."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: Numeric keys with a lower (and optional upper) bound: counts cannot be negative, sizes
#: of batches and chunks must be at least 1. None values (where allowed) skip the check.
BOUNDS: dict[str, tuple[float, float | None]] = {
    "data.n_trials_per_condition": (1, None),
    "audit.max_examples_per_kind": (0, None),
    "audit.min_bet": (0, None),
    "audit.max_bet": (0, None),
    "audit.run_gap_days": (0, None),
    "audit.workers": (1, 1024),
    "audit.min_effect": (0, None),
    "select.top_n": (1, None),
    "prototype.top_k": (1, None),
    "prototype.first_layer": (0, None),
    "pathways.first_layer": (0, None),
    "pathways.top_k_per_layer": (1, None),
    "pathways.max_graph_layers": (1, None),
    "pathways.n_replay": (0, None),
    "pathways.validate_min_abs_delta": (0, None),
    "pathways.validate_min_rel_delta": (0, None),
    "pathways.target_batch_size": (1, None),
    "pathways.replay_batch_size": (1, None),
    "pathways.chunk_size": (1, None),
    "pathways.limit": (0, None),
    "tokens.seed": (0, 2**32 - 1),
    "tokens.amplify_factor": (0, None),
    "integrate.top_upstream": (0, None),
    "integrate.top_hubs": (0, None),
    "app.port": (1, 65535),
    "app.max_custom_prompt_chars": (1, None),
    "app.max_plot_edges": (1, None),
}


def _check_bounds(cfg: "Config") -> None:
    for dotted, (lo, hi) in BOUNDS.items():
        section, key = dotted.split(".")
        v = getattr(getattr(cfg, section), key)
        if v is None:
            continue
        if v < lo or (hi is not None and v > hi):
            want = f"between {lo} and {hi}" if hi is not None else ("at least 1" if lo == 1 else "0 or more")
            raise UserError(f"config {dotted} must be {want}, got {v}")
    for i, amount in enumerate(cfg.tokens.bet_amounts):
        if amount < 0:
            raise UserError(f"config tokens.bet_amounts[{i}] must be 0 or more, got {amount}")
    if cfg.audit.min_bet > cfg.audit.max_bet:
        raise UserError(f"config audit.min_bet ({cfg.audit.min_bet}) is above audit.max_bet ({cfg.audit.max_bet})")
    if not 0 < cfg.audit.alpha < 1:
        raise UserError(f"config audit.alpha must be in (0, 1), got {cfg.audit.alpha}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config {key} must be one of {', '.join(allowed)}; got {_show(value)}")


# ---------------------------------------------------------------------------
# Loading with type checks
# ---------------------------------------------------------------------------

PATH_KEYS = {
    ("cache_dir",),
    ("data", "checkpoints_dir"),
    ("data", "responses_dir"),
    ("tokens", "patch_values_file"),
}
# model.name_or_path and sae.source are a hub id or a folder: resolved only if the
# relative folder exists next to the config file.
MAYBE_PATH_KEYS = {("model", "name_or_path"), ("sae", "source")}


INT64_MAX = 2**63 - 1
_ASCII_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_ASCII_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


def _show(value: Any, limit: int = 60) -> str:
    """repr of a config value for a one-line message (long or nested values cut short)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    except ValueError:  # an int of more than 4300 digits
        text = f"<{value.bit_length()}-bit integer>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\udcff" from a YAML escape
        raise UserError(f"config {key} holds an invalid character {value[exc.start]!r} at position {exc.start} "
                        f"(a lone surrogate, not text)") from None
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config {key} must be a mapping, got {type(value).__name__} {_show(value)}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config {key} must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config {key} must be a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            name = _check_text(str(k), f"{key} key {_show(k)}")
            out[name] = _coerce(v, args[1], f"{key}.{name}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config {key} must be true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config {key} must be an integer, got {_show(value)}")
        if isinstance(value, str) and _ASCII_INT_RE.fullmatch(value.strip()):
            value = int(value.strip())  # ASCII digits only: int() also reads other scripts' digits
        if not isinstance(value, int):
            raise UserError(f"config {key} must be an integer (ASCII digits), got {_show(value)}")
        if abs(value) > INT64_MAX:
            raise UserError(f"config {key} is too large: a {value.bit_length()}-bit integer, the limit is 64-bit")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config {key} must be a number, got {_show(value)}")
        if isinstance(value, str) and _ASCII_FLOAT_RE.fullmatch(value.strip()):
            value = float(value.strip())  # YAML 1.1 reads 1e5 (no dot) as a string
        if not isinstance(value, (int, float)):
            raise UserError(f"config {key} must be a number, got {_show(value)}")
        try:
            out = float(value)
        except OverflowError:
            out = math.inf
        if not math.isfinite(out):
            raise UserError(f"config {key} must be a finite number, got {_show(value, 30)}")
        return out
    if tp is str:
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads `since: 2024-01-01` as a date
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _check_text(str(value), key)
        raise UserError(f"config {key} must be a string, got {_show(value)}")
    return value


def _key_name(k: Any) -> str:
    return k if isinstance(k, str) and k.isprintable() and len(k) <= 40 else _show(k, 40)


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(_key_name(k) for k in data if k not in names)
    if unknown:
        where = f"section {prefix!r}" if prefix else "top level"
        raise UserError(f"config: unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(data: dict, base_dir: Path | None = None) -> Config:
    cfg = _build(Config, data or {})
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg.validate()


def _resolve_paths(cfg: Config, base: Path) -> None:
    for keys in PATH_KEYS:
        obj = cfg
        for k in keys[:-1]:
            obj = getattr(obj, k)
        v = getattr(obj, keys[-1])
        if v and not Path(v).expanduser().is_absolute():
            setattr(obj, keys[-1], str((base / v).resolve()))
        elif v:
            setattr(obj, keys[-1], str(Path(v).expanduser()))
    for keys in MAYBE_PATH_KEYS:
        obj = getattr(cfg, keys[0])
        v = getattr(obj, keys[1])
        if v and (v.startswith(".") or v.startswith("/") or v.startswith("~")):
            p = Path(v).expanduser()
            setattr(obj, keys[1], str(p if p.is_absolute() else (base / p).resolve()))
        elif v and (base / v).is_dir():
            setattr(obj, keys[1], str((base / v).resolve()))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    base = Path.cwd()
    where = ""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"config file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
        data = _read_yaml_mapping(p)
        base = p.resolve().parent
        where = f" (in {p}{' or --set' if overrides else ''})"
    elif overrides:
        where = " (from --set)"
    data = dict(data)
    try:
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value)
        cfg = config_from_dict(data, base)
    except UserError as exc:
        raise UserError(f"{exc}{where}") from None
    except RecursionError:  # a value nested too deep for the type checks
        raise UserError(f"config values are nested too deeply{where}") from None
    cfg.source_path = str(Path(path).resolve()) if path is not None else None
    return cfg


MAX_FLOW_DEPTH = 100


def _flow_depth(text: str) -> tuple[int, int]:
    """(deepest run of open [ or { brackets, its line): a cheap bound on YAML flow nesting."""
    depth = best = 0
    line = best_line = 1
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
                if best > MAX_FLOW_DEPTH:
                    break
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "\n":
            line += 1
    return best, best_line


def _read_yaml_mapping(p: Path) -> dict:
    """The file's top-level mapping, or one line naming the file and what is wrong."""
    import yaml

    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"config file {p} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} "
                        f"(offset {exc.start}); save it as UTF-8") from None
    depth, line = _flow_depth(text)
    if depth > MAX_FLOW_DEPTH:  # PyYAML recurses per level: refuse before it spends seconds on it
        raise UserError(f"config file {p} is nested more than {MAX_FLOW_DEPTH} brackets deep (line {line})")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"config file {p} is not valid YAML: {exc.problem or exc.context}{at}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise UserError(f"config file {p} is nested too deeply to be a config") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise UserError(f"config file {p} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level, not a {type(data).__name__}")
    return data


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_set_arguments(items: list[str] | None) -> dict[str, Any]:
    """Parse `--set key=value` items; values are read as YAML scalars (so 3, true, null work)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v != "" else ""
        except (yaml.YAMLError, RecursionError):
            out[k.strip()] = v
    return out


def dump_config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True, width=1000)
