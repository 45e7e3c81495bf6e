"""Step 06's model page: the README (model card), the public manifest and prompts.txt.

Pure text from the storyboard manifest, the score report and the LoRA's metadata: nothing here
touches the network or the disk, so the card can be checked line by line in a test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.config import LORA_FILE, N_PANELS, panel_file
from kolors_lib.core.settings import lora_scale

LORA_NAME = LORA_FILE
EXPORTS = {"diffusers": "kolors_lora.diffusers.safetensors", "kohya": "kolors_lora.kohya.safetensors"}
PANELS = N_PANELS  # the challenge's count; a card shows as many panels as its manifest has
BASE_MODEL = "Kwai-Kolors/Kolors"
LICENSE = "Apache License 2.0"
TASK = "text-to-image-synthesis"


def model_url(repo_id: str) -> str:
    """The model page of `repo_id` on the hub ($MODELSCOPE_ENDPOINT or modelscope.cn)."""
    from kolors_lib.core.hub import hub_endpoint

    return f"{hub_endpoint().rstrip('/')}/models/{repo_id}"


def _num(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _fmt(value: Any, digits: int = 3) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _g(value: float) -> str:
    return f"{value:g}"


def public_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The storyboard manifest with this machine's paths replaced by repo paths."""
    out = json.loads(json.dumps(manifest))
    lora = out.get("lora")
    if isinstance(lora, dict):
        lora["file"] = LORA_NAME
    base = out.get("base_model")
    if isinstance(base, dict):
        base.pop("folder", None)
    if out.get("story_file"):
        out["story_file"] = Path(str(out["story_file"])).name
    for i, panel in enumerate(out.get("panels") or [], start=1):
        if isinstance(panel, dict):
            panel["file"] = f"samples/{panel_file(i)}"
    if "grid" in out:
        out["grid"] = "samples/storyboard.png"
    return out


FRONT_MATTER = f"""---
frameworks:
- Pytorch
license: {LICENSE}
tasks:
- {TASK}
base_model:
- {BASE_MODEL}
base_model_relation: adapter
tags:
- lora
- kolors
- text-to-image
---
"""
TINY_NOTE = """> **Note:** this LoRA was trained with the course's `tiny` profile (a random-weight test model):
> it only exercises the pipeline and does not work on the real Kolors.
"""
TOY_NOTE = """> **Note:** this LoRA was trained with the course's `toy` profile (a small Kolors trained on a toy world
> of coloured shapes): it shows its style on that toy model only and does not work on the real Kolors.
"""
PROFILE_NOTES = {"tiny": TINY_NOTE, "toy": TOY_NOTE}  # the offline profiles: their LoRAs fit no real Kolors
FILES_TABLE = f"""## Files

| file | naming | for |
|---|---|---|
| `{LORA_NAME}` | DiffSynth / peft (`blocks.N...lora_A.default.weight`) | DiffSynth-Studio |
| `{EXPORTS['diffusers']}` | PEFT-style diffusers (`unet.down_blocks...lora_A.weight`) | diffusers `KolorsPipeline` |
| `{EXPORTS['kohya']}` | kohya (`lora_unet_..._to_q.lora_down.weight` + `.alpha`) | ComfyUI, WebUI |
| `samples/` | the {{count}} panels and the storyboard grid | |
| `manifest.json`, `prompts.txt` | every setting and prompt of the samples | |
"""
# LoRA metadata keys shown under "Training settings", in this order, with their labels
TRAINING_KEYS = [("base_model", "base model"), ("profile", "profile"), ("steps", "steps"),
                 ("learning_rate", "learning rate"), ("batch_size", "batch size"),
                 ("grad_accum", "gradient accumulation"), ("precision", "precision"), ("resolution", "resolution"),
                 ("seed", "seed"), ("target_modules", "target modules"), ("init_lora_weights", "LoRA init"),
                 ("scheduler", "scheduler"), ("center_crop", "center crop"), ("random_flip", "random flip")]
LICENSE_SECTION = f"""## License

This LoRA: {LICENSE}. Using it with Kolors is also subject to the Kolors model license.
"""


@dataclass(frozen=True)
class CardFacts:
    """What the card says about one LoRA, read once from the manifest and the LoRA's metadata."""

    repo_id: str
    manifest: Mapping[str, Any]
    lora_meta: Mapping[str, Any]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        """The training scale alpha/rank (strength 1.0)."""
        return lora_scale(self.alpha, self.rank)

    @property
    def trigger(self) -> str:
        """The trigger word (the LoRA's, else the manifest's), or "" for none."""
        return str(self.lora_meta.get("trigger_word") or self.manifest.get("trigger_word") or "").strip()

    @property
    def strength(self) -> float:
        """The strength the samples were drawn at (1.0 when the manifest does not say)."""
        return _num((self.manifest.get("lora") or {}).get("strength"), 1.0)

    @property
    def negative(self) -> str:
        """The samples' negative prompt."""
        return str(self.manifest.get("negative") or "")

    @property
    def count(self) -> int:
        """How many panels the samples have (8 for the challenge)."""
        return len(self.manifest["panels"])

    @property
    def example(self) -> str:
        """The first panel's prompt, used in the code examples."""
        return str(self.manifest["panels"][0]["prompt"])


def _title_section(facts: CardFacts) -> list[str]:
    title = str(facts.manifest.get("title") or facts.repo_id.split("/", 1)[1])
    lines = [f"# {title}", "",
             f"A LoRA for [Kolors 可图]({'https://modelscope.cn/models/' + BASE_MODEL}) (UNet attention "
             f"`to_q/to_k/to_v/to_out`, rank {facts.rank}, alpha {_g(facts.alpha)}), trained with DiffSynth-Studio, "
             f"and the {facts.count}-panel story it draws.", "", "![storyboard](samples/storyboard.png)", ""]
    note = PROFILE_NOTES.get(str(facts.lora_meta.get("profile")))
    if note:
        lines += note.splitlines() + [""]
    return lines


def _trigger_section(facts: CardFacts) -> list[str]:
    trigger = facts.trigger
    return ["## Trigger word 触发词", "",
            (f"Put `{trigger}` in the prompt (the sample prompts below already contain it)." if trigger else
             "None: this LoRA was trained without a trigger word; it applies its style to any prompt."), ""]


def _strength_section(facts: CardFacts) -> list[str]:
    alpha, rank, scale = _g(facts.alpha), facts.rank, _g(facts.scale)
    return [
        "## Recommended strength 推荐强度", "",
        f"Strength **1.0** = the training scale alpha/rank = {alpha}/{rank} = {scale}. The samples use "
        f"strength {_g(facts.strength)}. The same strength in each tool:", "",
        "| tool | file | setting for strength s | s = 1.0 |",
        "|---|---|---|---|",
        f"| DiffSynth `ModelManager.load_lora(path, lora_alpha=...)` (W += lora_alpha·B·A) | `{LORA_NAME}` | "
        f"`lora_alpha = s × {alpha}/{rank}` | `lora_alpha={scale}` |",
        f"| diffusers `set_adapters(..., adapter_weights=...)` (alpha/rank baked in) | `{EXPORTS['diffusers']}` | "
        "`s` | `1.0` |",
        f"| ComfyUI `LoraLoaderModelOnly` strength_model / WebUI `<lora:...:s>` | `{EXPORTS['kohya']}` | `s` | "
        "`1.0` |", "",
        "0.5-1.0 is a good range; above 1.0 the style over-takes the prompt.", ""]


def _diffsynth_usage(facts: CardFacts) -> list[str]:
    m = facts.manifest
    return [
        "### DiffSynth-Studio", "", "```python", "import torch",
        "from diffsynth import ModelManager, SDXLImagePipeline", "from modelscope import snapshot_download", "",
        f'kolors = snapshot_download("{BASE_MODEL}")',
        f'lora_dir = snapshot_download("{facts.repo_id}")',
        'model_manager = ModelManager(torch_dtype=torch.float16, device="cuda", file_path_list=[',
        '    f"{kolors}/text_encoder",',
        '    f"{kolors}/unet/diffusion_pytorch_model.safetensors",',
        '    f"{kolors}/vae/diffusion_pytorch_model.safetensors",',
        "])",
        f'model_manager.load_lora(f"{{lora_dir}}/{LORA_NAME}", lora_alpha={_g(facts.scale * facts.strength)})  '
        f"# strength {_g(facts.strength)}",
        "pipe = SDXLImagePipeline.from_model_manager(model_manager)",
        f"image = pipe(prompt={facts.example!r},",
        f"             negative_prompt={facts.negative!r},",
        f"             cfg_scale={_g(_num(m.get('cfg_scale'), 4.0))}, "
        f"num_inference_steps={int(_num(m.get('steps'), 50))}, "
        f"height={int(_num(m.get('height'), 1024))}, width={int(_num(m.get('width'), 1024))})",
        'image.save("panel.png")', "```", ""]


def _diffusers_usage(facts: CardFacts) -> list[str]:
    return [
        "### diffusers", "", "```python", "import torch", "from diffusers import KolorsPipeline",
        "from modelscope import snapshot_download", "",
        'pipe = KolorsPipeline.from_pretrained("Kwai-Kolors/Kolors-diffusers", torch_dtype=torch.float16,',
        '                                      variant="fp16").to("cuda")',
        f'pipe.load_lora_weights(snapshot_download("{facts.repo_id}"), weight_name="{EXPORTS["diffusers"]}",',
        '                       adapter_name="story")',
        f'pipe.set_adapters(["story"], adapter_weights=[{_g(facts.strength)}])',
        f"image = pipe({facts.example!r}, negative_prompt={facts.negative!r}).images[0]", "```", ""]


def _comfyui_usage(facts: CardFacts) -> list[str]:
    node = {"class_type": "LoraLoaderModelOnly",
            "inputs": {"lora_name": EXPORTS["kohya"], "strength_model": facts.strength, "model": ["1", 0]}}
    return [
        "### ComfyUI", "",
        f"Copy `{EXPORTS['kohya']}` to `ComfyUI/models/loras/`, then put a **LoraLoaderModelOnly** node "
        f"(`strength_model` = {_g(facts.strength)}) between the sampler and a Kolors loader that returns a native "
        "ComfyUI model, e.g. ComfyUI-Kolors-MZ (ComfyUI alone has no Kolors: no ChatGLM3 text encoder). "
        "In API-format JSON:", "", "```json", json.dumps(node, indent=2), "```", "",
        "With ComfyUI-KwaiKolorsWrapper (the challenge's workflow): copy `comfyui/kolors_story_lora/` to "
        f"`ComfyUI/custom_nodes/` and `{EXPORTS['diffusers']}` to `ComfyUI/models/loras/`, then load "
        "`comfyui/kolors_story_workflow.json` (scene 1 with its seed; the *Load Kolors Story LoRA* node's "
        "strength has the meaning above).", ""]


def _samples_section(facts: CardFacts) -> list[str]:
    m, neg = facts.manifest, facts.negative
    lines = ["## Samples and prompts 示例与提示词", "",
             f"Steps {m.get('steps', 'n/a')}, CFG {m.get('cfg_scale', 'n/a')}, "
             f"{m.get('width', '?')}x{m.get('height', '?')}, LoRA strength {_g(facts.strength)}."
             + (f" Negative prompt: `{neg}`" if neg else ""), ""]
    for i, panel in enumerate(m["panels"], start=1):
        scene = str(panel.get("scene") or f"panel {i}").replace("[", "(").replace("]", ")")
        lines += [f"### {i}. {scene}", "", f"![{scene}](samples/{panel_file(i)})", "", "```text",
                  str(panel["prompt"]), "```", "", f"seed {panel.get('seed', 'n/a')}", ""]
    return lines


def _training_section(facts: CardFacts) -> list[str]:
    meta = facts.lora_meta
    return (["## Training settings 训练参数", "", "| setting | value |", "|---|---|",
             f"| rank / alpha | {facts.rank} / {_g(facts.alpha)} (scale {_g(facts.scale)}) |",
             f"| trigger word | {facts.trigger or '(none)'} |"]
            + [f"| {label} | {meta[key]} |" for key, label in TRAINING_KEYS if meta.get(key) not in (None, "")])


def _scores_section(scores: Mapping[str, Any] | None, count: int) -> list[str]:
    if scores is None:  # step 05 not run
        return ["## Scores 评分", "", "Not scored: the samples were published without step 05's aesthetic "
                "score and style consistency (未评分).", ""]
    consistency = scores.get("consistency")
    cos = consistency.get("mean_pairwise_cosine") if isinstance(consistency, dict) else consistency
    mean, gate = _num(scores.get("mean")), _num(scores.get("gate"))
    passed = scores.get("passed")
    verdict = "PASS" if passed else ("FAIL" if passed is not None else "n/a")
    lines = ["## Scores 评分", "",
             f"- aesthetic score (the challenge's predictor), mean of the {count} panels: **{_fmt(mean)}** vs the "
             f"gate {_fmt(gate, 1)}: **{verdict}**",
             f"- style consistency (mean pairwise cosine of the panels' image embeddings): **{_fmt(cos)}**", ""]
    files = [f for f in scores.get("files") or [] if isinstance(f, dict) and f.get("panel", True)]
    if files:
        lines += ["| panel | aesthetic | consistency to the others |", "|---|---|---|"]
        lines += [f"| {f.get('file')} | {_fmt(f.get('score'))} | {_fmt(f.get('consistency_to_others'))} |"
                  for f in files]
        lines.append("")
    return lines


def model_card(repo_id: str, manifest: Mapping[str, Any], scores: Mapping[str, Any] | None,
               lora_meta: Mapping[str, Any], rank: int, alpha: float) -> str:
    """README.md in ModelScope's text-to-image LoRA style: front matter, usage, the prompts, settings, scores.

    scores None (step 05 not run): the card says the samples are not scored.
    """
    facts = CardFacts(repo_id, manifest, lora_meta, rank, alpha)
    files = FILES_TABLE.format(count=facts.count)
    lines = [*FRONT_MATTER.splitlines(), "", *_title_section(facts), *files.splitlines(), "",
             *_trigger_section(facts), *_strength_section(facts), "## How to use 使用方法", "",
             *_diffsynth_usage(facts), *_diffusers_usage(facts), *_comfyui_usage(facts),
             *_samples_section(facts), *_training_section(facts), "", *_scores_section(scores, facts.count),
             *LICENSE_SECTION.splitlines(), ""]
    return "\n".join(lines)


def prompts_text(manifest: Mapping[str, Any]) -> str:
    """prompts.txt: one `samples/panel_XX.png<TAB>prompt` line per panel."""
    head = (f"# the {len(manifest['panels'])} sample images and their prompts; negative prompt, seeds and "
            "settings: manifest.json\n")
    return head + "".join(f"samples/{panel_file(i)}\t{' '.join(str(p['prompt']).split())}\n"
                          for i, p in enumerate(manifest["panels"], start=1))
