"""Save, load, convert and merge Kolors UNet LoRAs in DiffSynth, diffusers and kohya naming.

Strength has one meaning everywhere: 1.0 is the training scale alpha/rank (peft's scale).

* ``diffsynth``: what DiffSynth's trainer (peft) saves, ``blocks.7.transformer_blocks.0.attn1.to_q
  .lora_A.default.weight`` / ``.lora_B.default.weight``; ΔW = (alpha/rank)·B·A with alpha and rank in
  the file's metadata (the tensors alone do not carry alpha).
* ``diffusers``: PEFT-style names that ``UNet2DConditionModel.load_lora_adapter(prefix="unet")`` and
  ``KolorsPipeline.load_lora_weights`` read, ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1
  .to_q.lora_A.weight``. diffusers applies such a file at scale 1.0, so alpha/rank is baked into lora_B:
  adapter weight 1.0 = training strength.
* ``kohya``: ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (diffusers-style module path, as ComfyUI's stock LoRA loader, WebUI and
  diffusers' kohya converter read it); loaders apply alpha/rank, so their strength 1.0 = training strength.
  Not kohya's sgm naming (``input_blocks_4_1_...``): KolorsPipeline's loader passes no ``unet_config``,
  which diffusers needs to remap sgm block numbers. For ComfyUI use this format: its stock loader
  matches PEFT-style diffusers keys only in the ``attn1.processor.to_q`` spelling.

Offline, diffusers finds a local LoRA file by folder + ``weight_name=`` (a bare file path makes it
guess a Hub file name and fail).

DiffSynth's own ``ModelManager.load_lora(path, lora_alpha=x)`` merges ``W += x·B·A`` without dividing by
rank; :func:`diffsynth_lora_alpha` gives the ``x`` that matches a strength here.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import LORA_FORMATS
from kolors_lib.core.console import quiet_logger
from kolors_lib.core.errors import LoraFormatError, LoraMismatchError, LoraNotFoundError
from kolors_lib.core.files import save_safetensors
from kolors_lib.core.settings import lora_scale

FORMATS = LORA_FORMATS  # one list for the CLI and the converters
META_JSON_KEYS = "kolors_lib.json_keys"  # metadata entry listing the values stored JSON-encoded
_DIFFSYNTH = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.default\.weight$")
_DIFFUSERS = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_KOHYA = re.compile(r"^lora_unet_(?P<module>[^.]+)\.(?:lora_(?P<part>down|up)\.weight|(?P<alpha>alpha))$")
_PATTERNS = {"diffsynth": _DIFFSYNTH, "diffusers": _DIFFUSERS, "kohya": _KOHYA}
_MAX_LISTED = 20


@dataclass
class LoraPair:
    """One adapted module: ΔW = scale·B·A (B: out×rank, A: rank×in)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA rank of this module."""
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The effective weight update scale·B·A in float32."""
        return self.scale * (self.up.float() @ self.down.float())


def _listing(names: Sequence[str]) -> str:
    """A short comma-separated listing of key names."""
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


# ---------------------------------------------------------------- key mapping


@functools.cache
def module_map() -> dict[str, str]:
    """DiffSynth module path -> diffusers module path for every Kolors UNet weight (derived, not typed)."""
    patch_torchvision()
    from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # diffusers sets its logger's level on first use: before ours
    # diffusers warns at import that torchao (pinned for the int8 base) lacks Tensor classes it never uses here
    with quiet_logger("diffusers"):
        from diffusers import UNet2DConditionModel
    from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG

    with torch.device("meta"):
        config = {k: v for k, v in KOLORS_UNET_CONFIG.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(config)
    names = [k for k in unet.state_dict() if k.endswith(".weight")]
    # DiffSynth's own renaming, applied to index tensors so each renamed key points back at its source
    renamed = SDXLUNetStateDictConverter().from_diffusers({k: torch.tensor([i]) for i, k in enumerate(names)})
    renamed = renamed[0] if isinstance(renamed, tuple) else renamed
    return {new.removesuffix(".weight"): names[int(i)].removesuffix(".weight") for new, i in renamed.items()}


@functools.cache
def _reverse_maps() -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers module -> DiffSynth module, kohya module -> DiffSynth module)."""
    forward = module_map()
    diffusers = {v: k for k, v in forward.items()}
    kohya = {v.replace(".", "_"): k for k, v in forward.items()}
    return diffusers, kohya


def diffusers_module(diffsynth_module: str) -> str:
    """The diffusers module path of a DiffSynth UNet module path."""
    try:
        return module_map()[diffsynth_module]
    except KeyError:
        raise LoraFormatError(f"no Kolors UNet module named {diffsynth_module!r}") from None


def kohya_module(diffsynth_module: str) -> str:
    """The kohya (`lora_unet_...` without prefix) name of a DiffSynth UNet module path."""
    return diffusers_module(diffsynth_module).replace(".", "_")


# ---------------------------------------------------------------- format detection and parsing


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """The naming (diffsynth/diffusers/kohya) that most keys of a LoRA state dict follow."""
    counts = {fmt: sum(1 for k in state_dict if pat.match(k)) for fmt, pat in _PATTERNS.items()}
    best = max(counts, key=lambda f: counts[f])
    if counts[best] == 0:
        raise LoraFormatError(
            f"no LoRA keys in a known naming ({', '.join(FORMATS)}): {_listing(list(state_dict))}")
    return best


def _partner(key: str, have_up: bool) -> str:
    """The name of the missing other half (A/down or B/up) of a LoRA pair, from a key that is there."""
    stem = re.sub(r"\.(lora_[AB](\.default)?\.weight|lora_(down|up)\.weight|alpha)$", "", key)
    if key.startswith("lora_unet_"):
        return f"{stem}.lora_down.weight" if have_up else f"{stem}.lora_up.weight"
    tail = ".default.weight" if key.endswith(".default.weight") else ".weight"
    return f"{stem}.lora_A{tail}" if have_up else f"{stem}.lora_B{tail}"


def lora_number(value: Any, what: str, integer: bool = False) -> float:
    """A LoRA alpha or rank (metadata, argument or tensor) as a finite number > 0, else a LoraFormatError."""
    try:
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        kind = "a whole number > 0" if integer else "a finite number > 0"
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise LoraFormatError(f"{what} must be {kind}, not {shown}")
    return number


def _meta_alpha(meta: Mapping[str, Any] | None, alpha: float | None) -> float | None:
    """alpha given explicitly, else from file metadata, else None (each checked: finite and > 0)."""
    if alpha is not None:
        return lora_number(alpha, "alpha")
    if meta and meta.get("alpha") is not None:
        return lora_number(meta["alpha"], "the LoRA's metadata alpha")
    return None


def _check_tensors(parts: Mapping[str, Mapping[str, torch.Tensor]], keys: Mapping[str, str]) -> None:
    """Each pair: 2-D lora_A (rank, in) and lora_B (out, rank) of one rank, finite values; kohya alpha a scalar."""
    for module, p in parts.items():
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise LoraMismatchError(f"{keys[module]}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                                    "are not a (rank, in) / (out, rank) pair of one rank")
        for part, tensor in p.items():
            if part == "alpha":
                if tensor.numel() != 1:
                    raise LoraFormatError(f"{keys[module]}: alpha must be one number, not a tensor of shape "
                                          f"{tuple(tensor.shape)}")
                lora_number(tensor, f"{keys[module]}: alpha")
            elif not torch.isfinite(tensor).all():
                raise LoraFormatError(f"{keys[module]}: {part} tensor holds NaN or infinite values; the file is "
                                      "broken (a diverged training?): train again or use another LoRA")


def parse_lora(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
               alpha: float | None = None, fmt: str | None = None) -> dict[str, LoraPair]:
    """Read a LoRA in any of the three namings into {DiffSynth module: LoraPair}; unknown keys raise."""
    fmt = fmt or detect_format(state_dict)
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    diffusers_rev, kohya_rev = _reverse_maps() if fmt != "diffsynth" else ({}, {})
    pattern = _PATTERNS[fmt]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, str] = {}
    unknown = []
    for key, value in state_dict.items():
        m = pattern.match(key)
        module = m.group("module") if m else None
        if m and fmt == "diffusers":
            module = diffusers_rev.get(module)
        elif m and fmt == "kohya":
            module = kohya_rev.get(module)
        if module is None:
            unknown.append(key)
            continue
        half = m.groupdict().get("part")
        part = "alpha" if half is None else ("down" if half in ("A", "down") else "up")
        parts.setdefault(module, {})[part] = value
        keys[module] = key
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} key(s) not in {fmt} naming for the Kolors UNet: {_listing(unknown)}")
    incomplete = [_partner(keys[m], "up" in p) for m, p in parts.items() if "down" not in p or "up" not in p]
    if incomplete:
        raise LoraMismatchError(f"LoRA does not fit: missing keys: {_listing(incomplete)}")
    _check_tensors(parts, keys)
    default_alpha = _meta_alpha(meta, alpha)
    if fmt == "diffsynth" and default_alpha is None:
        raise LoraFormatError("a DiffSynth/peft LoRA does not store alpha: pass alpha (the training "
                              "LoraConfig.alpha) or keep it in the file's metadata")
    pairs = {}
    for module, p in parts.items():
        rank = int(p["down"].shape[0])
        if fmt == "diffusers":
            scale = 1.0  # diffusers applies PEFT-style files without alphas at scale 1.0 (ours are baked)
        elif fmt == "kohya":
            # kohya: alpha/rank, and a missing alpha means alpha = rank
            scale = lora_scale(p["alpha"].item(), rank) if "alpha" in p else 1.0
        else:
            scale = lora_scale(default_alpha, rank)
        pairs[module] = LoraPair(p["down"], p["up"], scale)
    return pairs


def _nominal(pairs: Mapping[str, LoraPair], meta: Mapping[str, Any] | None) -> tuple[int, float]:
    """The (rank, alpha) to write: the file's training values if known, else derived from the pairs."""
    ranks = {p.rank for p in pairs.values()}
    rank = (int(lora_number(meta["rank"], "the LoRA's metadata rank", integer=True))
            if meta and meta.get("rank") is not None else max(ranks))
    if meta and meta.get("alpha") is not None:
        return rank, lora_number(meta["alpha"], "the LoRA's metadata alpha")
    scales = {round(p.scale * p.rank, 6) for p in pairs.values()}
    return rank, scales.pop() if len(scales) == 1 else float(rank)


def _up_for(pair: LoraPair, scale: float) -> torch.Tensor:
    """lora_B / lora_up rescaled so that scale·B·A keeps the pair's effective update."""
    if abs(pair.scale - scale) <= 1e-12 * max(1.0, abs(scale)):
        return pair.up
    return (pair.up.float() * (pair.scale / scale)).to(pair.up.dtype)


def render_lora(pairs: Mapping[str, LoraPair], fmt: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Write {DiffSynth module: LoraPair} as a state dict in naming `fmt` (strength 1.0 = same ΔW)."""
    unknown = [m for m in pairs if m not in module_map()]
    if unknown:
        raise LoraFormatError(f"{len(unknown)} LoRA module(s) not in the Kolors UNet: {_listing(unknown)}")
    out: dict[str, torch.Tensor] = {}
    for module in sorted(pairs):
        pair = pairs[module]
        if fmt == "diffsynth":
            out[f"{module}.lora_A.default.weight"] = pair.down
            out[f"{module}.lora_B.default.weight"] = _up_for(pair, lora_scale(alpha, pair.rank))
        elif fmt == "diffusers":
            name = diffusers_module(module)
            out[f"unet.{name}.lora_A.weight"] = pair.down
            out[f"unet.{name}.lora_B.weight"] = _up_for(pair, 1.0)
        elif fmt == "kohya":
            name = f"lora_unet_{kohya_module(module)}"
            out[f"{name}.lora_down.weight"] = pair.down
            out[f"{name}.lora_up.weight"] = _up_for(pair, lora_scale(alpha, pair.rank))
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        else:
            raise LoraFormatError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return out


def convert_lora(state_dict: Mapping[str, torch.Tensor], fmt: str, meta: Mapping[str, Any] | None = None,
                 alpha: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a LoRA (any naming) to naming `fmt`; returns (state dict, metadata for save_lora)."""
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    meta = dict(meta or {})
    if alpha is not None:
        meta["alpha"] = lora_number(alpha, "--alpha")
    pairs = parse_lora(state_dict, meta, alpha)
    rank, nominal_alpha = _nominal(pairs, meta)
    kept = {k: v for k, v in meta.items() if not k.startswith("ss_") and k != "strength_note"}
    out_meta = {**kept, "format": fmt, "rank": rank, "alpha": nominal_alpha}
    if fmt == "diffusers":
        out_meta["strength_note"] = "alpha/rank is baked into lora_B: adapter weight 1.0 = training strength"
    if fmt == "kohya":
        out_meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                         "ss_network_alpha": str(nominal_alpha)})
    return render_lora(pairs, fmt, rank, nominal_alpha), out_meta


# ---------------------------------------------------------------- files


def _encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata: strings as they are, everything else JSON (listed under META_JSON_KEYS)."""
    out, encoded = {}, []
    for key, value in meta.items():
        if key == META_JSON_KEYS:
            continue
        if isinstance(value, str):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
            encoded.append(str(key))
    if encoded:
        out[META_JSON_KEYS] = json.dumps(sorted(encoded))
    return out


def _decode_meta(raw: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of _encode_meta."""
    try:
        encoded = json.loads(raw.get(META_JSON_KEYS, "[]"))
        if not isinstance(encoded, list):
            raise ValueError("not a list")
        return {k: (json.loads(v) if k in set(map(str, encoded)) else v)
                for k, v in raw.items() if k != META_JSON_KEYS}
    except ValueError as err:
        raise LoraFormatError(f"the LoRA's metadata is broken ({META_JSON_KEYS} or a value it lists is not "
                              f"valid JSON: {err})") from None


def save_lora(state_dict: Mapping[str, torch.Tensor], path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write a LoRA `.safetensors` atomically with string metadata (rank, alpha, format, settings...)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files are written as .safetensors")
    meta = dict(meta)
    found = detect_format(state_dict)
    if meta.setdefault("format", found) != found:
        raise LoraFormatError(f"metadata says format {meta['format']!r} but the keys are in {found} naming")
    if found == "diffsynth" and meta.get("alpha") is None:
        raise LoraFormatError("a DiffSynth/peft LoRA needs alpha in its metadata (tensors lack it)")
    return save_safetensors(state_dict, path, _encode_meta(meta))


def _file_kind(path: Path) -> str:
    """A guess at what a non-safetensors file is, for the error message."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        return "a torch.save/Lightning checkpoint (zip of pickles)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "not a safetensors file"


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a LoRA `.safetensors` -> (state dict, metadata); pickles are refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraNotFoundError(f"LoRA file not found: {path}: train one (step 03) or give the path of an "
                                "existing .safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFormatError(f"{path}: cannot read as safetensors, {_file_kind(path)} ({err}); this loader "
                              f"only reads .safetensors, it never unpickles files") from None
    try:
        return state, _decode_meta(raw)
    except LoraFormatError as err:
        raise LoraFormatError(f"{path}: {err}") from None


@dataclass
class LoraSpec:
    """A LoRA file parsed once: tensors, metadata, pairs, rank, alpha and hash; every consumer takes this."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    pairs: dict[str, LoraPair]
    rank: int
    alpha: float
    sha256: str

    @property
    def scale(self) -> float:
        """The training scale alpha/rank (strength 1.0)."""
        return lora_scale(self.alpha, self.rank)


def read_lora_spec(path: str | Path, alpha: float | None = None, fallback_alpha: float | None = None) -> LoraSpec:
    """Read and parse a LoRA file once. alpha: given, else the file's metadata, else `fallback_alpha`."""
    from kolors_lib.core.files import sha256_file

    path = Path(path)
    state, meta = load_lora(path)
    if alpha is None and meta.get("alpha") is None:
        alpha = fallback_alpha
    if alpha is not None:
        meta = {**meta, "alpha": lora_number(alpha, "alpha")}
    try:
        pairs = parse_lora(state, meta)
        rank, nominal_alpha = _nominal(pairs, meta)
    except LoraFormatError as err:
        raise type(err)(f"{path}: {err}") from None
    return LoraSpec(path.resolve(), state, meta, pairs, rank, nominal_alpha, sha256_file(path))


def export_lora(src: str | Path, fmt: str, dest: str | Path, alpha: float | None = None) -> Path:
    """Convert LoRA file `src` to naming `fmt` and write it to `dest` (a file, or a folder to write into)."""
    src, dest = Path(src), Path(dest)
    if dest.is_dir():
        dest = dest / f"{src.stem}.{fmt}.safetensors"
    state, meta = load_lora(src)
    try:
        out, out_meta = convert_lora(state, fmt, meta, alpha)
    except (LoraFormatError, LoraMismatchError) as err:
        raise type(err)(f"{src}: {err}") from None
    out_meta.setdefault("source_file", src.name)
    return save_lora(out, dest, out_meta)


# ---------------------------------------------------------------- merging into DiffSynth's UNet


def diffsynth_lora_alpha(strength: float, rank: int, alpha: float) -> float:
    """The `lora_alpha` for DiffSynth's `ModelManager.load_lora` (W += x·B·A) matching `strength` here."""
    return float(strength) * lora_scale(alpha, rank)


def check_lora_fits(model: torch.nn.Module, pairs: Mapping[str, LoraPair]) -> None:
    """Raise LoraMismatchError naming missing/unexpected modules and wrong shapes of a LoRA for `model`."""
    weights = {k.removesuffix(".weight"): v for k, v in model.state_dict().items() if k.endswith(".weight")}
    unexpected = [f"{m}.lora_A.default.weight" for m in pairs if m not in weights]
    leaves = {m.rsplit(".", 1)[-1] for m in pairs}
    # every module peft would target with these leaf names (its suffix rule) must be present
    missing = [f"{m}.lora_A.default.weight" for m, w in weights.items()
               if m.rsplit(".", 1)[-1] in leaves and w.ndim == 2 and m not in pairs]
    shapes = []
    for module, pair in pairs.items():
        weight = weights.get(module)
        if weight is None:
            continue
        down, up = tuple(pair.down.shape), tuple(pair.up.shape)
        fits = len(down) == len(up) == 2 and up[1] == down[0] and (up[0], down[1]) == tuple(weight.shape)
        if not fits:
            shapes.append(f"{module} (weight {tuple(weight.shape)}, lora_A {down}, lora_B {up})")
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes)}")
    if problems:
        raise LoraMismatchError("LoRA does not fit the UNet; " + "; ".join(problems))


def merge_lora(unet: torch.nn.Module, state_dict: Mapping[str, torch.Tensor] | LoraSpec, strength: float = 1.0,
               alpha: float | None = None, meta: Mapping[str, Any] | None = None) -> int:
    """Merge a LoRA into DiffSynth's UNet in place, W += strength·(alpha/rank)·B·A; returns modules merged.

    Any naming, or a parsed LoraSpec, is accepted; a DiffSynth/peft state dict needs `alpha` (or `meta`). Unlike
    DiffSynth's loader (strict=False), a LoRA that does not fit raises LoraMismatchError.
    """
    pairs = state_dict.pairs if isinstance(state_dict, LoraSpec) else parse_lora(state_dict, meta, alpha)
    check_lora_fits(unet, pairs)
    return merge_pairs(unet, pairs, strength)


def merge_pairs(unet: torch.nn.Module, pairs: Mapping[str, LoraPair], strength: float) -> int:
    """W += strength·scale·B·A for already parsed and checked pairs; returns modules merged."""
    params = dict(unet.named_parameters())
    buffers = dict(unet.named_buffers())
    with torch.no_grad():
        for module, pair in pairs.items():
            weight = params.get(f"{module}.weight", buffers.get(f"{module}.weight"))
            delta = float(strength) * pair.delta().to(weight.device)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(pairs)


__all__ = ["LoraPair", "LoraSpec", "check_lora_fits", "convert_lora", "detect_format", "diffsynth_lora_alpha",
           "export_lora", "load_lora", "merge_lora", "merge_pairs", "parse_lora", "read_lora_spec", "render_lora",
           "save_lora"]
