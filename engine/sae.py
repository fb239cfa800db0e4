"""LlamaScope residual SAEs: loading (hub or local folder) and the three encode conventions.

File layout, per layer `L`, under the SAE source (a hub repository such as
`fnlp/Llama3_1-8B-Base-LXR-8x`, or a local folder):

    Llama3_1-8B-Base-L{L}R-8x/hyperparams.json
    Llama3_1-8B-Base-L{L}R-8x/checkpoints/final.safetensors
        encoder.weight (d_sae, d_model)   encoder.bias (d_sae,)
        decoder.weight (d_model, d_sae)   decoder.bias (d_model,)

`x` below is the raw resid_post vector (output of `model.model.layers[L]`), W_E =
encoder.weight, b_E = encoder.bias, W_D = decoder.weight, b_D = decoder.bias,
s_in = sqrt(d_model) / dataset_average_activation_norm.in (s_out likewise with .out),
theta = jump_relu_threshold, n_i = ||W_D[:, i] * s_in/s_out||_2.

``study`` (default; the gambling study's `LlamaScopeWorking`, with which its causal
features were found):
    pre_i = s_in * (W_E[i] . x) + b_E[i]          a_i = pre_i if pre_i > 0 else 0
    x_hat = (W_D a + b_D) / s_in                     (threshold ignored)

``jumprelu`` (the LlamaScope authors' lm_saes reference, unit-decoder-norm form):
    pre_i = n_i * (W_E[i] . x + b_E[i] / s_in)     a_i = pre_i if pre_i > theta else 0
    x_hat = sum_i a_i * W_D[:, i] * (s_in/s_out) / n_i + b_D / s_out

``saelens`` (SAELens / Neuronpedia, normalisation folded in, threshold scaled):
    pre_i = s_in * (W_E[i] . x) + b_E[i]          a_i = pre_i if pre_i > theta * s_in else 0
    x_hat = (W_D a + b_D) / s_in

All three are stored the same way, without copying the big matrices:
    pre = (x @ W_E^T) * enc_gain + enc_bias,  a = pre * [pre > threshold],
    x_hat = (a * dec_gain) @ W_D^T + dec_bias,
so a feature's encoder row in residual units is e_i = enc_gain_i W_E[i] and its
decoder direction is d_i = dec_gain_i W_D[:, i]: x_hat = sum_i a_i d_i + dec_bias.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import SAEConfig
from engine.errors import UserError, one_line, shown_value

WEIGHT_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


@dataclass
class SAEFiles:
    layer: int
    hyperparams: Path
    weights: Path


@dataclass
class SAE:
    layer: int
    convention: str
    d_model: int
    d_sae: int
    W_enc: Any  # (d_sae, d_model), raw encoder.weight
    enc_gain: Any  # (d_sae,)
    enc_bias: Any  # (d_sae,)
    W_dec: Any  # (d_model, d_sae), raw decoder.weight
    dec_gain: Any  # (d_sae,)
    dec_bias: Any  # (d_model,)
    threshold: float
    s_in: float
    s_out: float
    hyperparams: dict = field(default_factory=dict)
    source: str = ""

    # -- the forward maps ----------------------------------------------------
    @property
    def dtype(self):
        return self.W_enc.dtype

    @property
    def device(self):
        return self.W_enc.device

    def pre_activation(self, x):
        """Pre-activations (..., d_sae) for raw resid_post x (..., d_model)."""
        x = x.to(self.W_enc.dtype)
        return (x @ self.W_enc.T) * self.enc_gain + self.enc_bias

    def gate(self, pre):
        import torch

        # where() rather than a product, so inactive features are +0.0, not -0.0
        return torch.where(pre > self.threshold, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))

    def encode(self, x):
        return self.gate(self.pre_activation(x))

    def decode(self, a):
        a = a.to(self.W_dec.dtype)
        return (a * self.dec_gain) @ self.W_dec.T + self.dec_bias

    # -- rows used by attribution -------------------------------------------
    def encoder_rows(self, idx):
        """(k, d_model) encoder rows e_i in residual units, and their biases (k,)."""
        return self.W_enc[idx] * self.enc_gain[idx, None], self.enc_bias[idx]

    def decoder_rows(self, idx):
        """(k, d_model) decoder directions d_i in residual units (normalisation folded in)."""
        return (self.W_dec[:, idx] * self.dec_gain[idx]).T

    def to(self, device=None, dtype=None) -> "SAE":
        for name in ("W_enc", "enc_gain", "enc_bias", "W_dec", "dec_gain", "dec_bias"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.W_enc, self.enc_gain, self.enc_bias, self.W_dec, self.dec_gain, self.dec_bias)
        )


# ---------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------


def is_local_source(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def layer_folder(cfg: SAEConfig, layer: int) -> str:
    return cfg.folder_template.format(layer=layer)


def locate(cfg: SAEConfig, layer: int, need_weights: bool = True) -> SAEFiles:
    """Find (and, for a hub repository, download) one layer's files."""
    folder = layer_folder(cfg, layer)
    if is_local_source(cfg.source):
        root = Path(cfg.source).expanduser() / folder
        hp = root / cfg.hyperparams_file
        w = root / cfg.weights_file
        if not hp.is_file():
            raise UserError(f"SAE for layer {layer}: {hp} not found (sae.source={cfg.source})")
        if need_weights and not w.is_file():
            raise UserError(f"SAE for layer {layer}: {w} not found (sae.source={cfg.source})")
        return SAEFiles(layer, hp, w)
    if cfg.source.startswith((".", "/", "~")):
        raise UserError(f"SAE source folder not found: {cfg.source}")
    hp = _hub_file(cfg, f"{folder}/{cfg.hyperparams_file}")
    w = _hub_file(cfg, f"{folder}/{cfg.weights_file}") if need_weights else Path()
    return SAEFiles(layer, hp, w)


def _hub_file(cfg: SAEConfig, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        from engine.hub import local_only

        return Path(
            hf_hub_download(
                repo_id=cfg.source,
                filename=filename,
                revision=cfg.revision,
                local_files_only=local_only(cfg.local_files_only),
            )
        )
    except Exception as exc:  # hub errors come in many classes; the message is what matters
        raise UserError(
            f"cannot get {filename} from the SAE repository {cfg.source!r}: it is not in the local "
            f"Hugging Face cache and the hub could not be reached ({type(exc).__name__}); "
            f"point sae.source at a local folder or download the layer first"
        ) from None


def read_hyperparams(path: Path) -> dict:
    """The layer's hyperparams.json as a dict, or one line naming the file and what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"SAE hyperparameters {path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    try:
        hp = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"SAE hyperparameters {path} are not UTF-8 JSON: byte 0x{raw[exc.start]:02x} "
                        f"at offset {exc.start}") from None
    except RecursionError:
        raise UserError(f"SAE hyperparameters {path} are not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"SAE hyperparameters {path} are not valid JSON: {one_line(exc)}") from None
    if not isinstance(hp, dict):
        raise UserError(f"SAE hyperparameters {path} must be a JSON object, not {type(hp).__name__}")
    return hp




#: Widths beyond this are not an SAE of a language model (and would not fit in memory).
MAX_DIM = 2**31 - 1


def _hp_dim(hp: dict, key: str, path: Path) -> int | None:
    """A positive integer width from the hyperparameters, None when absent."""
    if key not in hp or hp[key] is None:
        return None
    v = hp[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_DIM:
        raise UserError(f"SAE hyperparameters {path}: {key} is {shown_value(hp[key])}, not a positive integer")
    return v


def _hp_number(value: Any, key: str, path: Path, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"SAE hyperparameters {path}: {key} is {shown_value(value)}, not a number")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out) or (positive and not out > 0):
        raise UserError(f"SAE hyperparameters {path}: {key} is {shown_value(value)}, not a "
                        f"{'positive ' if positive else ''}finite number")
    return out


def hp_dims(hp: dict, path: Path) -> tuple[int, int] | None:
    """(d_model, d_sae) when the hyperparameters give both (checked), else None."""
    d_model, d_sae = _hp_dim(hp, "d_model", path), _hp_dim(hp, "d_sae", path)
    return (d_model, d_sae) if d_model is not None and d_sae is not None else None


def _norms(hp: dict, path: Path) -> tuple[float, float]:
    norm = hp.get("dataset_average_activation_norm")
    key = "dataset_average_activation_norm"
    if isinstance(norm, dict) and "in" in norm:
        n_in = _hp_number(norm["in"], f"{key}.in", path, positive=True)
        n_out = _hp_number(norm["out"], f"{key}.out", path, positive=True) if "out" in norm else n_in
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        n_in = n_out = _hp_number(norm, key, path, positive=True)
    else:
        raise UserError(f"SAE hyperparameters {path} lack dataset_average_activation_norm.in"
                        + (f" (it is {shown_value(norm)})" if norm is not None else ""))
    return n_in, n_out


def sae_width(cfg: SAEConfig, layer: int) -> tuple[int, int]:
    """(d_model, d_sae) of a layer's SAE without loading the weights."""
    files = locate(cfg, layer, need_weights=False)
    dims = hp_dims(read_hyperparams(files.hyperparams), files.hyperparams)
    if dims is not None:
        return dims
    files = locate(cfg, layer)
    from safetensors import safe_open

    try:
        with safe_open(str(files.weights), framework="pt") as fh:
            if "encoder.weight" not in fh.keys():
                raise UserError(f"SAE weights {files.weights} lack encoder.weight")
            shape = fh.get_slice("encoder.weight").get_shape()
    except UserError:
        raise
    except Exception as exc:  # SafetensorError, OSError: the file is this layer's problem
        raise UserError(f"SAE weights {files.weights} cannot be read as safetensors: {one_line(exc)}") from None
    if len(shape) != 2:
        raise UserError(f"SAE weights {files.weights}: encoder.weight has shape {tuple(shape)}, expected (d_sae, d_model)")
    return int(shape[1]), int(shape[0])


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_sae(cfg: SAEConfig, layer: int, device: str = "cpu", dtype: str | None = None,
             convention: str | None = None) -> SAE:
    """Load one layer's SAE in the configured dtype and encode convention."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.model import torch_dtype

    files = locate(cfg, layer)
    hp = read_hyperparams(files.hyperparams)
    tdt = torch_dtype(dtype or cfg.dtype)
    dims = hp_dims(hp, files.hyperparams)
    try:
        # straight onto the target device (memory-mapped read), no host copy of a GPU SAE
        tensors = load_file(str(files.weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"SAE weights {files.weights} cannot be read as safetensors: {one_line(exc)}") from None
    missing = [k for k in WEIGHT_KEYS if k not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:8]) + (" ..." if len(tensors) > 8 else "")
        raise UserError(f"SAE weights {files.weights} lack {', '.join(missing)} (found: {found or 'nothing'})")
    for k in WEIGHT_KEYS:
        if not tensors[k].is_floating_point():
            raise UserError(f"SAE weights {files.weights}: {k} holds {str(tensors[k].dtype).replace('torch.', '')}, "
                            f"not floating-point numbers")
    W_E, b_E, W_D, b_D = (tensors[k] for k in WEIGHT_KEYS)
    if W_E.ndim != 2:
        raise UserError(f"SAE weights {files.weights}: encoder.weight has shape {tuple(W_E.shape)}, "
                        f"expected 2 dimensions (d_sae, d_model)")
    d_model, d_sae = dims if dims is not None else (int(W_E.shape[1]), int(W_E.shape[0]))
    expected = {
        "encoder.weight": (d_sae, d_model),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_model, d_sae),
        "decoder.bias": (d_model,),
    }
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise UserError(
                f"SAE weights {files.weights}: {k} has shape {tuple(tensors[k].shape)}, expected {shape} "
                f"(d_model={d_model}, d_sae={d_sae} from {files.hyperparams.name})"
            )
    return build_sae(W_E, b_E, W_D, b_D, hp, layer=layer, convention=convention or cfg.convention,
                     device=device, dtype=tdt, source=str(files.weights), hp_path=files.hyperparams)


def build_sae(W_E, b_E, W_D, b_D, hp: dict, *, layer: int, convention: str, device="cpu", dtype=None,
              source: str = "", hp_path: Path | None = None) -> SAE:
    """Fold one convention's normalisation into gains and biases (see the module docstring)."""
    import torch

    dtype = dtype or torch.float32
    d_sae, d_model = W_E.shape
    n_in, n_out = _norms(hp, hp_path or Path(source or "hyperparams.json"))
    s_in = math.sqrt(d_model) / n_in
    s_out = math.sqrt(d_model) / n_out
    # Gains and biases are computed in float64 (vectors only: the big matrices are never
    # copied), then cast once.
    b_E64, b_D64 = b_E.double().cpu(), b_D.double().cpu()
    ones = torch.ones(d_sae, dtype=torch.float64)
    if convention == "study":
        enc_gain, enc_bias = ones * s_in, b_E64
        dec_gain, dec_bias = ones / s_in, b_D64 / s_in
        threshold = 0.0
    elif convention == "jumprelu":
        if "jump_relu_threshold" not in hp:
            raise UserError(f"SAE hyperparameters {hp_path or source} lack jump_relu_threshold (needed by convention jumprelu)")
        # column norms in float64, a block of columns at a time (no full float64 copy)
        n = torch.cat([W_D[:, i:i + 4096].double().norm(dim=0).cpu() for i in range(0, d_sae, 4096)]) * (s_in / s_out)
        n = torch.where(n > 0, n, torch.ones_like(n))
        enc_gain, enc_bias = n, n * b_E64 / s_in
        dec_gain, dec_bias = (s_in / s_out) / n, b_D64 / s_out
        threshold = _hp_number(hp["jump_relu_threshold"], "jump_relu_threshold", hp_path or Path(source))
    elif convention == "saelens":
        if "jump_relu_threshold" not in hp:
            raise UserError(f"SAE hyperparameters {hp_path or source} lack jump_relu_threshold (needed by convention saelens)")
        enc_gain, enc_bias = ones * s_in, b_E64
        dec_gain, dec_bias = ones / s_in, b_D64 / s_in
        threshold = _hp_number(hp["jump_relu_threshold"], "jump_relu_threshold", hp_path or Path(source)) * s_in
    else:
        raise UserError(f"unknown SAE encode convention {convention!r}: use study, jumprelu or saelens")
    del b_E64, b_D64
    return SAE(
        layer=layer,
        convention=convention,
        d_model=int(d_model),
        d_sae=int(d_sae),
        W_enc=W_E.to(device=device, dtype=dtype),
        enc_gain=enc_gain.to(device=device, dtype=dtype),
        enc_bias=enc_bias.to(device=device, dtype=dtype),
        W_dec=W_D.to(device=device, dtype=dtype),
        dec_gain=dec_gain.to(device=device, dtype=dtype),
        dec_bias=dec_bias.to(device=device, dtype=dtype),
        threshold=threshold,
        s_in=s_in,
        s_out=s_out,
        hyperparams=hp,
        source=source,
    )


class SAECache:
    """Loads SAEs per layer on demand and keeps at most `max_layers` of them."""

    def __init__(self, cfg: SAEConfig, device: str, dtype: str | None = None, max_layers: int | None = None):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.max_layers = max_layers
        self._saes: dict[int, SAE] = {}

    def get(self, layer: int) -> SAE:
        if layer not in self._saes:
            if self.max_layers is not None and len(self._saes) >= self.max_layers:
                self.release(next(iter(self._saes)))
            self._saes[layer] = load_sae(self.cfg, layer, device=self.device, dtype=self.dtype)
        return self._saes[layer]

    def release(self, layer: int) -> None:
        self._saes.pop(layer, None)

    def clear(self) -> None:
        self._saes.clear()
