"""Load Kolors Story LoRA: a ComfyUI node for ComfyUI-KwaiKolorsWrapper's ``KOLORSMODEL``.

Self-contained on purpose (torch + safetensors only, no kolors_lib): users copy this folder into
``ComfyUI/custom_nodes/``.

What the wrapper passes around as ``KOLORSMODEL`` (its ``DownloadAndLoadKolorsModel.loadmodel``) is a dict
``{"pipeline": StableDiffusionXLPipeline(unet=UNet2DConditionModel, scheduler=...), "dtype": torch.float16}``;
its ``KolorsSampler`` reads ``kolors_model["pipeline"]`` and moves ``pipeline.unet`` between devices.

Strength means the same as everywhere in the course: **1.0 = the training scale alpha/rank**, so
``W += strength · (alpha/rank) · B·A`` for every adapted weight. Files accepted (the naming is detected):

* diffusers export (``unet.<module>.lora_A.weight`` / ``lora_B``): alpha/rank is already baked into lora_B,
  so the scale is 1 (a ``<module>.alpha`` key, if present, is applied as alpha/rank);
* kohya export (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``):
  alpha/rank from the file (no alpha key: alpha = rank);
* DiffSynth / peft training file (``blocks.N.transformer_blocks.M.attn1.to_q.lora_A.default.weight``):
  alpha from the file's metadata (``alpha``), rank from the tensors.

Every key must fit the UNet: unknown modules, incomplete A/B pairs, adapted-module families that are only
partly covered and wrong shapes raise :class:`StoryLoraError` naming the keys; nothing is changed then.

The merge is copy-on-write: the node returns a new ``KOLORSMODEL`` dict with a shallow copy of the pipeline
whose UNet shares every untouched weight with the input model and owns merged copies of the adapted ones
(for the real Kolors UNet, about 1.8 GB extra in fp16). The input model is never modified, so ComfyUI's
cache of the loader output stays clean, strengths never stack when the node re-runs, and bypassing or
deleting the node gives the base model back. Two of these nodes in a chain stack their LoRAs.
For scripts that want to merge in place, :func:`merge_in_place` returns the original weights, and
:func:`restore_weights` puts them back.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

try:  # only inside ComfyUI; the module imports (and works on a path string) without it
    import folder_paths
except ImportError:  # pragma: no cover - depends on the environment
    folder_paths = None

# DiffSynth's SDXL/Kolors UNet numbers its 46 blocks flat; these are the 11 attention (Transformer2D) blocks
ATTENTION_BLOCKS = {
    7: "down_blocks.1.attentions.0", 10: "down_blocks.1.attentions.1",
    15: "down_blocks.2.attentions.0", 18: "down_blocks.2.attentions.1",
    21: "mid_block.attentions.0",
    25: "up_blocks.0.attentions.0", 28: "up_blocks.0.attentions.1", 31: "up_blocks.0.attentions.2",
    35: "up_blocks.1.attentions.0", 38: "up_blocks.1.attentions.1", 41: "up_blocks.1.attentions.2",
}
# inside a transformer block, the few names DiffSynth spells differently from diffusers
_INNER_RENAMES = (
    (re.compile(r"^(transformer_blocks\.\d+\.attn[12]\.to_out)$"), r"\1.0"),
    (re.compile(r"^(transformer_blocks\.\d+)\.act_fn\.proj$"), r"\1.ff.net.0.proj"),
    (re.compile(r"^(transformer_blocks\.\d+)\.ff$"), r"\1.ff.net.2"),
)
_DIFFSYNTH_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.default\.weight$")
_DIFFUSERS_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(?:unet\.)?(?P<module>.+)\.alpha$")
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>[^.]+)\.(?:lora_(?P<part>down|up)\.weight|(?P<alpha>alpha))$")
_MAX_LISTED = 20


class StoryLoraError(ValueError):
    """A LoRA file that cannot be merged into this Kolors model (names the keys)."""


def _listing(names: list[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def diffsynth_to_diffusers(module: str) -> str | None:
    """diffusers module path of a DiffSynth attention-block module path (None outside attention blocks)."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    if not m or int(m.group(1)) not in ATTENTION_BLOCKS:
        return None
    rest = m.group(2)
    for pattern, repl in _INNER_RENAMES:
        rest = pattern.sub(repl, rest)
    return f"{ATTENTION_BLOCKS[int(m.group(1))]}.{rest}"


# ---------------------------------------------------------------- reading a file


def resolve_lora_path(lora_file: str) -> str:
    """A path as given, else a name in ComfyUI's ``models/loras`` folder."""
    path = os.path.expanduser(str(lora_file).strip())
    if path and os.path.isfile(path):
        return path
    if folder_paths is not None and path:
        full = folder_paths.get_full_path("loras", path)
        if full:
            return full
    where = " (looked in ComfyUI's models/loras too)" if folder_paths is not None else ""
    raise FileNotFoundError(f"LoRA file not found: {lora_file!r}{where}")


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` LoRA; pickled checkpoints are refused, never unpickled."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types, OSError, ValueError...
        raise StoryLoraError(
            f"{path}: not a .safetensors file ({err}). This node never unpickles .ckpt/.pt files: convert a "
            f"DiffSynth checkpoint with `python -m kolors_lib export-lora IN --format diffusers OUT`") from None
    return state, meta


def _meta_number(meta: Mapping[str, Any], *names: str) -> float | None:
    for name in names:
        value = meta.get(name)
        if value is None or value == "":
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def detect_naming(state: Mapping[str, Any]) -> str:
    """``diffusers``, ``kohya`` or ``diffsynth``: the naming most keys follow."""
    counts = {"kohya": 0, "diffsynth": 0, "diffusers": 0}
    for key in state:
        if _KOHYA_KEY.match(key):
            counts["kohya"] += 1
        elif _DIFFSYNTH_KEY.match(key):
            counts["diffsynth"] += 1
        elif _DIFFUSERS_KEY.match(key) or _DIFFUSERS_ALPHA.match(key):
            counts["diffusers"] += 1
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        raise StoryLoraError(f"no LoRA keys in a known naming (diffusers, kohya, DiffSynth): {_listing(list(state))}")
    return best


# ---------------------------------------------------------------- keys -> UNet modules


def lora_pairs(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], unet: torch.nn.Module,
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{diffusers UNet module: (down/A, up/B, scale)} with ΔW = scale·up·down at strength 1.0.

    Raises StoryLoraError naming unexpected keys, incomplete pairs, uncovered modules and wrong shapes.
    """
    naming = detect_naming(state)
    weights = {name.removesuffix(".weight"): p for name, p in unet.named_parameters() if name.endswith(".weight")}
    kohya_names = {m.replace(".", "_"): m for m in weights}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    key_of: dict[str, str] = {}
    part_keys: dict[str, dict[str, str]] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        module, part = None, None
        if naming == "kohya":
            m = _KOHYA_KEY.match(key)
            if m:
                module = kohya_names.get(m.group("module"))
                part = "alpha" if m.group("alpha") else m.group("part")
        else:
            m = (_DIFFSYNTH_KEY if naming == "diffsynth" else _DIFFUSERS_KEY).match(key)
            if m:
                module, part = m.group("module"), {"A": "down", "B": "up"}[m.group("part")]
            elif naming == "diffusers" and _DIFFUSERS_ALPHA.match(key):
                module, part = _DIFFUSERS_ALPHA.match(key).group("module"), "alpha"
            if module is not None and module.startswith("blocks."):
                module = diffsynth_to_diffusers(module)
        if module is None or module not in weights or weights[module].ndim != 2:
            unexpected.append(key)
            continue
        parts.setdefault(module, {})[part] = value
        part_keys.setdefault(module, {})[part] = key
        if part != "alpha" or module not in key_of:  # name a weight key in messages, not the alpha
            key_of[module] = key
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (no such linear layer in the Kolors UNet): {_listing(unexpected)}")
    incomplete = [f"{key_of[m]} has no {'lora_B/lora_up' if 'down' in p else 'lora_A/lora_down'} partner"
                  for m, p in parts.items() if "down" not in p or "up" not in p]
    # every UNet layer of an adapted family (to_q, to_k, to_v, to_out, ...) must be covered, as peft targets them
    families = {_family(m) for m in parts}
    uncovered = [m for m, w in weights.items() if w.ndim == 2 and _family(m) in families and m not in parts]
    if incomplete or uncovered:
        missing = incomplete + [f"{m} (UNet layer with no LoRA weights)" for m in uncovered]
        problems.append(f"missing keys: {_listing(missing)}")
    shapes = []
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            continue
        down, up, weight = tuple(p["down"].shape), tuple(p["up"].shape), tuple(weights[module].shape)
        if not (len(down) == len(up) == 2 and up[1] == down[0] and (up[0], down[1]) == weight):
            bad = _bad_parts(down, up, weight)
            shapes.append(f"{' and '.join(part_keys[module][b] for b in bad)} "
                          f"(UNet weight {weight}, down/A {down}, up/B {up})")
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes)}")
    if problems:
        raise StoryLoraError("LoRA does not fit this Kolors UNet; " + "; ".join(problems))

    file_alpha = _meta_number(meta, "alpha", "lora_alpha", "ss_network_alpha")
    pairs = {}
    for module, p in parts.items():
        rank = int(p["down"].shape[0])
        if "alpha" in p:
            scale = float(p["alpha"].float().item()) / rank
        elif naming == "diffsynth":
            if file_alpha is None:
                raise StoryLoraError("a DiffSynth/peft LoRA does not store alpha in its tensors and this file's "
                                     "metadata has none: export it with kolors_lib (diffusers or kohya format)")
            scale = file_alpha / rank
        else:  # diffusers export: alpha/rank baked into lora_B; kohya without alpha: alpha = rank
            scale = 1.0
        pairs[module] = (p["down"], p["up"], scale)
    return pairs


def _bad_parts(down: tuple[int, ...], up: tuple[int, ...], weight: tuple[int, ...]) -> list[str]:
    """Which of a pair is misshapen for a (out, in) weight: down/A must be (rank, in), up/B (out, rank)."""
    bad = [name for name, shape, dim, size in (("down", down, 1, weight[1]), ("up", up, 0, weight[0]))
           if len(shape) != 2 or shape[dim] != size]
    return bad or ["down", "up"]  # both fit the weight but their ranks differ: either may be wrong


def _family(module: str) -> str:
    """The peft target name of a module path: its last non-numeric part (``...attn1.to_out.0`` -> ``to_out``)."""
    parts = [p for p in module.split(".") if not p.isdigit()]
    return parts[-1] if parts else module


# ---------------------------------------------------------------- merging


def merge_in_place(unet: torch.nn.Module, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                   strength: float) -> dict[str, torch.Tensor]:
    """``W += strength·scale·up·down`` in place (in float32, cast back); returns the original weights (CPU)."""
    params = dict(unet.named_parameters())
    originals = {}
    with torch.no_grad():
        for module, (down, up, scale) in pairs.items():
            weight = params[f"{module}.weight"]
            originals[f"{module}.weight"] = weight.detach().to("cpu", copy=True)
            delta = (float(strength) * scale) * (up.to(weight.device, torch.float32) @ down.to(weight.device,
                                                                                             torch.float32))
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return originals


def restore_weights(unet: torch.nn.Module, originals: Mapping[str, torch.Tensor]) -> None:
    """Undo :func:`merge_in_place` exactly, from the weights it returned."""
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def unet_with_own_weights(unet: torch.nn.Module, modules: list[str]) -> torch.nn.Module:
    """A copy of `unet` sharing every parameter except ``<module>.weight`` of `modules` (those are copied)."""
    own = {f"{m}.weight" for m in modules}
    memo = {id(p): p for name, p in unet.named_parameters() if name not in own}
    return copy.deepcopy(unet, memo)


def apply_story_lora(kolors_model: Mapping[str, Any], lora_path: str, strength: float = 1.0) -> dict[str, Any]:
    """A new KOLORSMODEL whose UNet has the LoRA merged at `strength` (1.0 = training scale); input untouched."""
    if not isinstance(kolors_model, Mapping) or "pipeline" not in kolors_model \
            or not hasattr(kolors_model["pipeline"], "unet"):
        raise TypeError("kolors_model must be ComfyUI-KwaiKolorsWrapper's KOLORSMODEL: a dict whose 'pipeline' "
                        "has a diffusers UNet as .unet")
    pipeline = kolors_model["pipeline"]
    state, meta = read_lora_file(lora_path)
    pairs = lora_pairs(state, meta, pipeline.unet)
    unet = unet_with_own_weights(pipeline.unet, list(pairs))
    merge_in_place(unet, pairs, strength)
    new_pipeline = copy.copy(pipeline)  # shallow: scheduler etc. shared, only the UNet differs
    new_pipeline.unet = unet
    info = {"file": os.path.basename(lora_path), "strength": float(strength), "modules": len(pairs),
            "naming": detect_naming(state), "strength_meaning": "1.0 = training scale alpha/rank"}
    stacked = list(kolors_model.get("story_loras", [])) + [info]
    return {**kolors_model, "pipeline": new_pipeline, "story_loras": stacked}


# ---------------------------------------------------------------- the node


def _lora_choices() -> Any:
    if folder_paths is not None:
        try:
            names = [n for n in folder_paths.get_filename_list("loras") if n.endswith(".safetensors")]
            return (names,)
        except Exception:  # pragma: no cover - an odd ComfyUI install: fall back to a path box
            pass
    return ("STRING", {"multiline": False, "default": ""})


class KolorsStoryLoRA:
    """Merge a course-trained Kolors LoRA into a KwaiKolorsWrapper KOLORSMODEL (strength 1.0 = training)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's API name
        return {
            "required": {
                "kolors_model": ("KOLORSMODEL",),
                "lora_file": _lora_choices(),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                       "tooltip": "1.0 = the training scale alpha/rank"}),
            },
        }

    RETURN_TYPES = ("KOLORSMODEL",)
    RETURN_NAMES = ("kolors_model",)
    FUNCTION = "load_lora"
    CATEGORY = "KwaiKolorsWrapper"
    DESCRIPTION = ("Merges a Kolors UNet LoRA (diffusers, kohya or DiffSynth naming, .safetensors) into a copy of "
                   "the model's UNet: W += strength*alpha/rank*B*A. The input model is left unchanged.")

    def load_lora(self, kolors_model: Mapping[str, Any], lora_file: str, strength: float) -> tuple[dict]:
        return (apply_story_lora(kolors_model, resolve_lora_path(lora_file), strength),)


NODE_CLASS_MAPPINGS = {"KolorsStoryLoRA": KolorsStoryLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"KolorsStoryLoRA": "Load Kolors Story LoRA"}
