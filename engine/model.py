"""Loading the LLM and reading its residual stream at the right place.

LlamaScope `L{L}R` SAEs read resid_post of block L: the output of
`model.model.layers[L]`. `hidden_states[L+1]` equals it for every block but the last,
whose `hidden_states` entry has the final RMSNorm applied. So resid_post is captured
with forward hooks on the blocks themselves, correct for every layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from engine.config import ModelConfig
from engine.errors import UserError, one_line, shown_value

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
           "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise UserError(f"unknown dtype {name!r}: use float32, float16 or bfloat16") from None


def resolve_device(name: str | None) -> str:
    """'auto' → cuda when torch sees one, else cpu; 'cuda' without a GPU is an error."""
    import torch

    name = (name or "auto").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}: use cpu, cuda or auto")
    return name


def is_local_model(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().is_dir()


def _hub_error(cfg: ModelConfig, exc: Exception) -> UserError:
    return UserError(
        f"cannot load model {cfg.name_or_path!r}: it is not a local folder, not in the local Hugging Face "
        f"cache, and the hub could not be reached or refused access ({type(exc).__name__}); "
        f"set model.name_or_path to a folder holding config.json and safetensors weights"
    )


#: config.json keys a LLaMA-style model needs, with their upper bounds (transformers would
#: silently fill a missing one with LLaMA-7B's default and then fail on the weights' shapes).
REQUIRED_INT_KEYS = {"hidden_size": 2**20, "num_hidden_layers": 10_000, "num_attention_heads": 2**16,
                     "intermediate_size": 2**24, "vocab_size": 2**24}
OPTIONAL_INT_KEYS = {"num_key_value_heads": 2**16, "head_dim": 2**16, "max_position_embeddings": 2**31 - 1}
OPTIONAL_NUMBER_KEYS = ("rms_norm_eps", "rope_theta")




def check_model_config(folder: Path) -> dict:
    """Read and check a local model folder's config.json: one line naming the file and key, or the dict."""
    import json
    import math

    path = Path(folder) / "config.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"model folder {folder} has no config.json") from None
    except OSError as exc:
        raise UserError(f"model config {path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    try:
        conf = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"model config {path} is not UTF-8 JSON: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None
    except RecursionError:
        raise UserError(f"model config {path} is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"model config {path} is not valid JSON: {one_line(exc)}") from None
    if not isinstance(conf, dict):
        raise UserError(f"model config {path} must be a JSON object, not {type(conf).__name__}")
    for key, hi in {**REQUIRED_INT_KEYS, **OPTIONAL_INT_KEYS}.items():
        if key not in conf or (key in OPTIONAL_INT_KEYS and conf[key] is None):
            if key in REQUIRED_INT_KEYS:
                raise UserError(f"model config {path} lacks {key} (a LLaMA-style config.json gives it)")
            continue
        v = conf[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
            raise UserError(f"model config {path}: {key} is {shown_value(v)}, not an integer in 1..{hi}")
    for key in OPTIONAL_NUMBER_KEYS:
        if key in conf:
            v = conf[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise UserError(f"model config {path}: {key} is {shown_value(v)}, not a positive finite number")
    if "head_dim" not in conf and conf["hidden_size"] % conf["num_attention_heads"]:
        raise UserError(f"model config {path}: hidden_size {conf['hidden_size']} is not a multiple of "
                        f"num_attention_heads {conf['num_attention_heads']}")
    kv = conf.get("num_key_value_heads")
    if kv and conf["num_attention_heads"] % kv:
        raise UserError(f"model config {path}: num_attention_heads {conf['num_attention_heads']} is not a multiple "
                        f"of num_key_value_heads {kv}")
    return conf


def check_model_weights(folder: Path, conf: dict) -> None:
    """Open every safetensors shard's header: a truncated or damaged shard, or an embedding or
    layer count that disagrees with config.json, is named here rather than deep in transformers."""
    import re

    from safetensors import safe_open

    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise UserError(f"model folder {folder} holds no *.safetensors weights (only safetensors are loaded)")
    layers: set[int] = set()
    embed = None
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for key in fh.keys():
                    m = re.match(r"model\.layers\.([0-9]+)\.", key)
                    if m:
                        layers.add(int(m.group(1)))
                    elif key == "model.embed_tokens.weight":
                        embed = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001  (SafetensorError for a truncated or damaged file)
            raise UserError(f"model weights {shard} cannot be read as safetensors: {one_line(exc)}") from None
    want = (conf["vocab_size"], conf["hidden_size"])
    if embed is not None and embed != want:
        raise UserError(f"model folder {folder}: model.embed_tokens.weight has shape {embed}, but config.json says "
                        f"(vocab_size, hidden_size) = {want}")
    if layers and len(layers) != conf["num_hidden_layers"]:
        raise UserError(f"model folder {folder}: the weights hold {len(layers)} decoder layers, but config.json says "
                        f"num_hidden_layers = {conf['num_hidden_layers']}")


def _source(cfg: ModelConfig) -> tuple[str, dict]:
    name = cfg.name_or_path
    if is_local_model(name):
        folder = Path(name).expanduser()
        check_model_config(folder)
        return str(folder), {"local_files_only": True}
    if name.startswith((".", "/", "~")):
        raise UserError(f"model folder not found: {name}")
    from engine.hub import local_only

    return name, {"local_files_only": local_only(cfg.local_files_only), "revision": cfg.revision}


def load_config_only(cfg: ModelConfig):
    """The model's transformers config, without weights (to validate ids early)."""
    from transformers import AutoConfig

    src, kw = _source(cfg)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False, **kw)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for a bad folder)
        if is_local_model(cfg.name_or_path):
            raise UserError(f"model folder {src} has no usable config.json ({type(exc).__name__}: {one_line(exc)})") from None
        if isinstance(exc, (OSError, ValueError)):
            raise _hub_error(cfg, exc) from None
        raise


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src, kw = _source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False, clean_up_tokenization_spaces=False, **kw)
    except Exception as exc:  # noqa: BLE001  (tokenizers raises a bare Exception for a bad tokenizer.json)
        if is_local_model(cfg.name_or_path):
            raise UserError(f"model folder {src} has no readable tokenizer ({type(exc).__name__}: {one_line(exc)})") from None
        if isinstance(exc, (OSError, ValueError)):
            raise _hub_error(cfg, exc) from None
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as the study did
    return tok


def load_model(cfg: ModelConfig, device: str, dtype: str | None = None):
    """AutoModelForCausalLM from a hub id or a local folder; safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    src, kw = _source(cfg)
    if is_local_model(cfg.name_or_path):
        check_model_weights(Path(src), check_model_config(Path(src)))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=torch_dtype(dtype or cfg.dtype),
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=cfg.attn_implementation,
            **kw,
        )
    except Exception as exc:  # noqa: BLE001  (a truncated safetensors, shapes that disagree with config.json)
        if is_local_model(cfg.name_or_path):
            raise UserError(f"model folder {src} cannot be loaded: {type(exc).__name__}: {one_line(exc)}") from None
        if isinstance(exc, (OSError, ValueError)):
            raise _hub_error(cfg, exc) from None
        raise
    model.to(device)
    model.eval()
    model.requires_grad_(False)  # activation gradients only; weights never need them
    return model


def decoder_layers(model):
    """The list of decoder blocks (LlamaForCausalLM.model.layers)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise UserError(f"model {type(model).__name__} has no .model.layers: only LLaMA-style models are supported")
    return inner.layers


def n_layers(model) -> int:
    return len(decoder_layers(model))


def _block_output(output):
    # Decoder layers return a tensor in transformers 5, a tuple in 4.x.
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    pass


@dataclass
class ResidCapture:
    """resid_post of the requested blocks, filled by forward hooks."""

    layers: tuple[int, ...]
    detach: bool = True
    stop_after_last: bool = True

    def __post_init__(self) -> None:
        self.resid: dict[int, object] = {}


@contextmanager
def capture_resid_post(model, layers: Iterable[int], detach: bool = True, stop_after_last: bool = True,
                       edit=None) -> Iterator[ResidCapture]:
    """Hook the blocks in `layers`; with stop_after_last the forward pass ends after the deepest.

    `edit(layer, h) -> h` may replace a block's output (used by interventions)."""
    layers = tuple(sorted(set(int(l) for l in layers)))
    cap = ResidCapture(layers, detach, stop_after_last)
    blocks = decoder_layers(model)
    deepest = layers[-1] if layers else None
    handles = []

    def make_hook(idx: int):
        def hook(module, args, output):
            h = _block_output(output)
            new = edit(idx, h) if edit is not None else None
            if new is not None:
                h = new
            cap.resid[idx] = h.detach() if detach else h
            if stop_after_last and idx == deepest:
                raise _StopForward
            if new is not None:
                return (new, *output[1:]) if isinstance(output, (tuple, list)) else new
            return None

        return hook

    for idx in layers:
        if not 0 <= idx < len(blocks):
            raise UserError(f"layer {idx} is outside the model (layers 0..{len(blocks) - 1})")
        handles.append(blocks[idx].register_forward_hook(make_hook(idx)))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def forward_resid_post(model, input_ids, layers: Iterable[int], attention_mask=None, grad: bool = False,
                       stop_early: bool = True) -> dict[int, object]:
    """One forward pass returning {layer: resid_post (B, T, d_model)} for the requested blocks."""
    import torch

    layers = list(layers)
    with torch.set_grad_enabled(grad), capture_resid_post(
        model, layers, detach=not grad, stop_after_last=stop_early
    ) as cap:
        try:
            inner = getattr(model, "model", model)
            inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return cap.resid


def block_inputs(model, hidden, position_ids=None, attention_mask=None):
    """Rotary embeddings and causal mask for running blocks directly on `hidden` (B, T, d)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    inner = getattr(model, "model", model)
    B, T = hidden.shape[:2]
    if position_ids is None:
        position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, -1)
    mask = create_causal_mask(
        config=inner.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=None,
        position_ids=position_ids,
    )
    pos_emb = inner.rotary_emb(hidden, position_ids=position_ids)
    return position_ids, mask, pos_emb


def run_blocks(model, hidden, start: int, stop: int, position_ids=None, attention_mask=None,
               keep: Iterable[int] = ()):
    """Run blocks start..stop (inclusive) on `hidden` = resid_post of block start-1.

    Returns resid_post of block `stop`, or a dict {layer: resid_post} for `keep` ∪ {stop}."""
    blocks = decoder_layers(model)
    position_ids, mask, pos_emb = block_inputs(model, hidden, position_ids, attention_mask)
    keep = set(keep)
    kept = {}
    h = hidden
    for idx in range(start, stop + 1):
        h = _block_output(
            blocks[idx](h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb, use_cache=False)
        )
        if idx in keep:
            kept[idx] = h
    if keep:
        kept[stop] = h
        return kept
    return h


def tokenize(tokenizer, text: str, device: str):
    """Token ids (1, T) with BOS, as the study tokenised its prompts."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=True)
    return enc["input_ids"].to(device)


def token_strings(tokenizer, ids) -> list[str]:
    """Readable token strings, one per id (decoded singly, so leading spaces survive)."""
    return [tokenizer.decode([int(i)]) for i in ids]
