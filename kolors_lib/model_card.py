"""Step 06's model page: the README (model card), the public manifest and prompts.txt.

Pure text from the storyboard manifest, the score report and the LoRA's metadata: nothing here
touches the network or the disk, so the card can be checked line by line in a test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kolors_lib.config import LORA_FILE, N_PANELS, panel_file

LORA_NAME = LORA_FILE
EXPORTS = {"diffusers": "kolors_lora.diffusers.safetensors", "kohya": "kolors_lora.kohya.safetensors"}
PANELS = N_PANELS  # the challenge's count; a card shows as many panels as its manifest has
BASE_MODEL = "Kwai-Kolors/Kolors"
LICENSE = "Apache License 2.0"
TASK = "text-to-image-synthesis"


def model_url(repo_id: str) -> str:
    """The model page of `repo_id` on the hub ($MODELSCOPE_ENDPOINT or modelscope.cn)."""
    from kolors_lib.hub import hub_endpoint

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


def model_card(repo_id: str, manifest: Mapping[str, Any], scores: Mapping[str, Any] | None,
               lora_meta: Mapping[str, Any], rank: int, alpha: float) -> str:
    """README.md in ModelScope's text-to-image LoRA style: front matter, usage, the prompts, settings, scores.

    scores None (step 05 not run): the card says the samples are not scored.
    """
    scale = alpha / rank
    count = len(manifest["panels"])
    trigger = str(lora_meta.get("trigger_word") or manifest.get("trigger_word") or "").strip()
    title = str(manifest.get("title") or repo_id.split("/", 1)[1])
    strength = _num((manifest.get("lora") or {}).get("strength"), 1.0)
    neg = str(manifest.get("negative") or "")
    example = str(manifest["panels"][0]["prompt"])
    lines = [
        "---",
        "frameworks:",
        "- Pytorch",
        f"license: {LICENSE}",
        "tasks:",
        f"- {TASK}",
        "base_model:",
        f"- {BASE_MODEL}",
        "base_model_relation: adapter",
        "tags:",
        "- lora",
        "- kolors",
        "- text-to-image",
        "---",
        "",
        f"# {title}",
        "",
        f"A LoRA for [Kolors 可图]({'https://modelscope.cn/models/' + BASE_MODEL}) (UNet attention "
        f"`to_q/to_k/to_v/to_out`, rank {rank}, alpha {_g(alpha)}), trained with DiffSynth-Studio, and the "
        f"{count}-panel story it draws.",
        "",
        "![storyboard](samples/storyboard.png)",
        "",
    ]
    if str(lora_meta.get("profile")) == "tiny":
        lines += ["> **Note:** this LoRA was trained with the course's `tiny` profile (a random-weight test model):",
                  "> it only exercises the pipeline and does not work on the real Kolors.", ""]
    lines += [
        "## Files",
        "",
        "| file | naming | for |",
        "|---|---|---|",
        f"| `{LORA_NAME}` | DiffSynth / peft (`blocks.N...lora_A.default.weight`) | DiffSynth-Studio |",
        f"| `{EXPORTS['diffusers']}` | PEFT-style diffusers (`unet.down_blocks...lora_A.weight`) | diffusers "
        "`KolorsPipeline` |",
        f"| `{EXPORTS['kohya']}` | kohya (`lora_unet_..._to_q.lora_down.weight` + `.alpha`) | ComfyUI, WebUI |",
        f"| `samples/` | the {count} panels and the storyboard grid | |",
        "| `manifest.json`, `prompts.txt` | every setting and prompt of the samples | |",
        "",
        "## Trigger word 触发词",
        "",
        (f"Put `{trigger}` in the prompt (the sample prompts below already contain it)." if trigger else
         "None: this LoRA was trained without a trigger word; it applies its style to any prompt."),
        "",
        "## Recommended strength 推荐强度",
        "",
        f"Strength **1.0** = the training scale alpha/rank = {_g(alpha)}/{rank} = {_g(scale)}. The samples use "
        f"strength {_g(strength)}. The same strength in each tool:",
        "",
        "| tool | file | setting for strength s | s = 1.0 |",
        "|---|---|---|---|",
        f"| DiffSynth `ModelManager.load_lora(path, lora_alpha=...)` (W += lora_alpha·B·A) | `{LORA_NAME}` | "
        f"`lora_alpha = s × {_g(alpha)}/{rank}` | `lora_alpha={_g(scale)}` |",
        f"| diffusers `set_adapters(..., adapter_weights=...)` (alpha/rank baked in) | `{EXPORTS['diffusers']}` | "
        "`s` | `1.0` |",
        f"| ComfyUI `LoraLoaderModelOnly` strength_model / WebUI `<lora:...:s>` | `{EXPORTS['kohya']}` | `s` | "
        "`1.0` |",
        "",
        "0.5-1.0 is a good range; above 1.0 the style over-takes the prompt.",
        "",
        "## How to use 使用方法",
        "",
        "### DiffSynth-Studio",
        "",
        "```python",
        "import torch",
        "from diffsynth import ModelManager, SDXLImagePipeline",
        "from modelscope import snapshot_download",
        "",
        f'kolors = snapshot_download("{BASE_MODEL}")',
        f'lora_dir = snapshot_download("{repo_id}")',
        'model_manager = ModelManager(torch_dtype=torch.float16, device="cuda", file_path_list=[',
        '    f"{kolors}/text_encoder",',
        '    f"{kolors}/unet/diffusion_pytorch_model.safetensors",',
        '    f"{kolors}/vae/diffusion_pytorch_model.safetensors",',
        "])",
        f'model_manager.load_lora(f"{{lora_dir}}/{LORA_NAME}", lora_alpha={_g(scale * strength)})  '
        f"# strength {_g(strength)}",
        "pipe = SDXLImagePipeline.from_model_manager(model_manager)",
        f"image = pipe(prompt={example!r},",
        f"             negative_prompt={neg!r},",
        f"             cfg_scale={_g(_num(manifest.get('cfg_scale'), 4.0))}, "
        f"num_inference_steps={int(_num(manifest.get('steps'), 50))}, "
        f"height={int(_num(manifest.get('height'), 1024))}, width={int(_num(manifest.get('width'), 1024))})",
        'image.save("panel.png")',
        "```",
        "",
        "### diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import KolorsPipeline",
        "from modelscope import snapshot_download",
        "",
        'pipe = KolorsPipeline.from_pretrained("Kwai-Kolors/Kolors-diffusers", torch_dtype=torch.float16,',
        '                                      variant="fp16").to("cuda")',
        f'pipe.load_lora_weights(snapshot_download("{repo_id}"), weight_name="{EXPORTS["diffusers"]}",',
        '                       adapter_name="story")',
        f'pipe.set_adapters(["story"], adapter_weights=[{_g(strength)}])',
        f"image = pipe({example!r}, negative_prompt={neg!r}).images[0]",
        "```",
        "",
        "### ComfyUI",
        "",
        f"Copy `{EXPORTS['kohya']}` to `ComfyUI/models/loras/`, then put a **LoraLoaderModelOnly** node "
        f"(`strength_model` = {_g(strength)}) between the sampler and a Kolors loader that returns a native "
        "ComfyUI model, e.g. ComfyUI-Kolors-MZ (ComfyUI alone has no Kolors: no ChatGLM3 text encoder). "
        "In API-format JSON:",
        "",
        "```json",
        json.dumps({"class_type": "LoraLoaderModelOnly",
                    "inputs": {"lora_name": EXPORTS["kohya"], "strength_model": strength, "model": ["1", 0]}},
                   indent=2),
        "```",
        "",
        "With ComfyUI-KwaiKolorsWrapper (the challenge's workflow): copy `comfyui/kolors_story_lora/` to "
        f"`ComfyUI/custom_nodes/` and `{EXPORTS['diffusers']}` to `ComfyUI/models/loras/`, then load "
        "`comfyui/kolors_story_workflow.json` (scene 1 with its seed; the *Load Kolors Story LoRA* node's "
        "strength has the meaning above).",
        "",
        "## Samples and prompts 示例与提示词",
        "",
        f"Steps {manifest.get('steps', 'n/a')}, CFG {manifest.get('cfg_scale', 'n/a')}, "
        f"{manifest.get('width', '?')}x{manifest.get('height', '?')}, LoRA strength {_g(strength)}."
        + (f" Negative prompt: `{neg}`" if neg else ""),
        "",
    ]
    for i, panel in enumerate(manifest["panels"], start=1):
        scene = str(panel.get("scene") or f"panel {i}").replace("[", "(").replace("]", ")")
        lines += [f"### {i}. {scene}", "", f"![{scene}](samples/{panel_file(i)})", "", "```text",
                  str(panel["prompt"]), "```", "", f"seed {panel.get('seed', 'n/a')}", ""]
    keys = [("base_model", "base model"), ("profile", "profile"), ("steps", "steps"),
            ("learning_rate", "learning rate"), ("batch_size", "batch size"), ("grad_accum", "gradient accumulation"),
            ("precision", "precision"), ("resolution", "resolution"), ("seed", "seed"),
            ("target_modules", "target modules"), ("init_lora_weights", "LoRA init"), ("scheduler", "scheduler"),
            ("center_crop", "center crop"), ("random_flip", "random flip")]
    lines += ["## Training settings 训练参数", "", "| setting | value |", "|---|---|",
              f"| rank / alpha | {rank} / {_g(alpha)} (scale {_g(scale)}) |",
              f"| trigger word | {trigger or '(none)'} |"]
    lines += [f"| {label} | {lora_meta[key]} |" for key, label in keys if lora_meta.get(key) not in (None, "")]
    lines += _score_lines(scores, count)
    lines += ["## License", "",
              f"This LoRA: {LICENSE}. Using it with Kolors is also subject to the Kolors model license.", ""]
    return "\n".join(lines)


def _score_lines(scores: Mapping[str, Any] | None, count: int) -> list[str]:
    """The card's Scores section: step 05's numbers, or "not scored"."""
    if scores is None:
        return ["", "## Scores 评分", "", "Not scored: the samples were published without step 05's aesthetic "
                "score and style consistency (未评分).", ""]
    consistency = scores.get("consistency")
    cos = consistency.get("mean_pairwise_cosine") if isinstance(consistency, dict) else consistency
    mean, gate = _num(scores.get("mean")), _num(scores.get("gate"))
    passed = scores.get("passed")
    verdict = "PASS" if passed else ("FAIL" if passed is not None else "n/a")
    lines = [
        "",
        "## Scores 评分",
        "",
        f"- aesthetic score (the challenge's predictor), mean of the {count} panels: **{_fmt(mean)}** vs the "
        f"gate {_fmt(gate, 1)}: **{verdict}**",
        f"- style consistency (mean pairwise cosine of the panels' image embeddings): **{_fmt(cos)}**",
        "",
    ]
    files = [f for f in scores.get("files") or [] if isinstance(f, dict) and f.get("panel", True)]
    if files:
        lines += ["| panel | aesthetic | consistency to the others |", "|---|---|---|"]
        lines += [f"| {f.get('file')} | {_fmt(f.get('score'))} | {_fmt(f.get('consistency_to_others'))} |"
                  for f in files]
        lines.append("")
    return lines


def prompts_text(manifest: Mapping[str, Any]) -> str:
    """prompts.txt: one `samples/panel_XX.png<TAB>prompt` line per panel."""
    head = (f"# the {len(manifest['panels'])} sample images and their prompts; negative prompt, seeds and "
            "settings: manifest.json\n")
    return head + "".join(f"samples/{panel_file(i)}\t{' '.join(str(p['prompt']).split())}\n"
                          for i, p in enumerate(manifest["panels"], start=1))
