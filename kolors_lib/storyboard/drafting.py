"""`story draft`: prompts for the 8 scenes drafted by an LLM from the camp's template, then edited by hand.

`draft_story(scenes_file)` does what the camp did with 通义千问:

1. reads the scene list (one scene per line; blank lines and lines starting with # are skipped);
2. fills the camp's template (8 scene descriptions; rules: 古风 style, full or upper body per
   scene, describe the character, the setting and the action; one example) and asks for the
   answer as a JSON list, one prompt per scene;
3. sends it with the `openai` client to an OpenAI-compatible chat endpoint: ModelScope
   API-Inference by default, DashScope or any other `base_url` the same way. The key is read from
   an environment variable (default MODELSCOPE_API_TOKEN) and is never printed or written;
4. validates the answer: exactly one non-empty prompt per scene, in Chinese (Kolors reads Chinese);
5. writes a story file (scene, prompt, seed 1..8; the camp's negative prompt and settings),
   atomically, after `load_story` has accepted it.

Without a key, offline, or when the answer fails validation, it says why in one line and writes a
story file composed from the template's rules instead: the style line, each scene as the action,
全身 or 上半身 by a keyword rule (`framing_for`) and an empty character sheet to fill in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.checks import finite
from kolors_lib.core.errors import DraftError
from kolors_lib.core.files import atomic_path
from kolors_lib.kolors.story import N_SCENES, load_story

DEFAULT_BASE_URL = "https://api-inference.modelscope.cn/v1"
DEFAULT_MODEL = "Qwen/Qwen2.5-72B-Instruct"  # a 通义千问 model served by ModelScope API-Inference
DEFAULT_KEY_ENV = "MODELSCOPE_API_TOKEN"
DEFAULT_TIMEOUT = 60.0
STYLE = "古风，水墨画"  # the template's example starts with it
NEGATIVE = "现代风格，数字画，丑陋，变形，嘈杂，模糊，低对比度，扭曲的手指，多余的手指"  # the camp's final negative
EXAMPLE = "古风，水墨画，一个黑色长发少女，坐在教室里，盯着黑板，深思，上半身，红色长裙"
# the camp's template (its learner notes, task 2), word for word except the scene list and the last
# paragraph, which asks for an answer a program can check
TEMPLATE = """你是一个文生图专家，我们现在要做一个实战项目，就是要编排一个文生图话剧
话剧由{count}张场景图片生成，你需要输出每张图片的生图提示词

具体的场景图片
{scenes}

生图提示词要求
1、风格为古风
2、根据场景确定是使用全身还是上半身
3、人物描述
4、场景描述
5、做啥事情

例子：
{example}

输出格式：只输出一个 JSON 数组，按场景顺序包含{count}个中文提示词字符串，不要输出其他内容。"""
# scenes that show the whole figure (standing, walking, riding...) get 全身, the others 上半身
FULL_BODY_WORDS = ("站", "走", "骑", "马", "跑", "跳", "舞", "路", "全身")


@dataclass
class DraftResult:
    """What `draft_story` wrote and where the prompts came from."""

    path: Path
    source: str  # "llm" or "template"
    prompts: list[str]
    note: str = ""  # why the template was used (one line), empty for "llm"


def read_scenes(path: str | Path) -> list[str]:
    """The scene list: one scene per non-blank line (lines starting with # are comments); exactly 8."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DraftError(f"scene list not found: {path}") from None
    except UnicodeDecodeError:
        raise DraftError(f"{path}: not UTF-8 text") from None
    scenes = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(scenes) != N_SCENES:
        raise DraftError(f"{path}: expected {N_SCENES} scenes, one per line, found {len(scenes)}")
    return scenes


def template_prompt(scenes: list[str]) -> str:
    """The camp's template filled with the numbered scene list."""
    listing = "\n".join(f"{i}、{scene}" for i, scene in enumerate(scenes, start=1))
    return TEMPLATE.format(count=len(scenes), scenes=listing, example=EXAMPLE)


def framing_for(scene: str) -> str:
    """全身 when the scene names a whole-body action or place (FULL_BODY_WORDS), else 上半身."""
    return "全身" if any(word in scene for word in FULL_BODY_WORDS) else "上半身"


def cjk_share(text: str) -> float:
    """The share of CJK ideographs among the letters of `text` (0 when it has none)."""
    letters = [c for c in text if c.isalpha()]
    cjk = [c for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf"]
    return len(cjk) / len(letters) if letters else 0.0


def _candidates(content: str) -> list[Any] | None:
    """The answer as a list: a JSON array (code fences allowed), else numbered lines '1、...'."""
    start, end = content.find("["), content.rfind("]")
    if 0 <= start < end:
        try:
            value = json.loads(content[start:end + 1])
            if isinstance(value, list):
                return value
        except json.JSONDecodeError:
            pass
    numbered = re.findall(r"^\s*\d+\s*[、.．:：)）]\s*(.+?)\s*$", content, flags=re.MULTILINE)
    return numbered or None


def parse_answer(content: str | None, count: int) -> list[str]:
    """The prompts of an answer, checked: `count` non-empty Chinese prompts; ValueError says what is wrong."""
    if not content or not content.strip():
        raise ValueError("the answer is empty")
    items = _candidates(content)
    if items is None:
        raise ValueError("the answer is neither a JSON list nor numbered lines")
    if len(items) != count:
        raise ValueError(f"the answer has {len(items)} prompts for {count} scenes")
    prompts = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"prompt {number} is empty or not text")
        if cjk_share(item) < 0.5:
            raise ValueError(f"prompt {number} is not in Chinese: {item[:40]!r}")
        prompts.append(" ".join(item.split()))
    return prompts


def ask_llm(scenes: list[str], base_url: str, model: str, api_key: str, timeout: float) -> list[str]:
    """Send the template to the chat endpoint once (no retries) and return the validated prompts."""
    from openai import OpenAI

    client = OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": template_prompt(scenes)}])
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise ValueError("the answer has no message") from None
    return parse_answer(content, len(scenes))


def _failure(err: Exception, base_url: str, key_env: str, timeout: float) -> str:
    """One line saying why the endpoint gave no usable prompts (the key is never part of it)."""
    import openai

    if isinstance(err, openai.AuthenticationError):
        return f"{base_url} refused the key in ${key_env} (HTTP 401)"
    if isinstance(err, openai.APITimeoutError):
        return f"{base_url} did not answer within {timeout:g} s"
    if isinstance(err, openai.APIConnectionError):
        return f"cannot reach {base_url} (offline?)"
    if isinstance(err, openai.APIStatusError):
        return f"{base_url} answered HTTP {err.status_code}"
    if isinstance(err, ValueError):
        return f"unusable answer from {base_url}: {err}"
    return f"{base_url} failed: {type(err).__name__}"


def _q(text: str) -> str:
    """A YAML scalar for any text: JSON strings are valid double-quoted YAML."""
    return json.dumps(text, ensure_ascii=False)


def story_text(scenes: list[str], title: str, prompts: list[str] | None, header: str) -> str:
    """A story file: finished prompts when given, else scenes by parts under the template's rules."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"title: {_q(title)}", f"negative: {_q(NEGATIVE)}", "cfg_scale: 4.0", "steps: 50", "width: 1024",
              "height: 1024"]
    if prompts is None:
        lines += [f"style: {_q(STYLE)}",
                  "# the character sheet: name: fixed description (e.g. 少女: 黑色长发少女); then write",
                  "# {少女} in an action, and the character reads the same in every panel",
                  "characters: {}"]
    lines.append("scenes:")
    for number, scene in enumerate(scenes, start=1):
        lines.append(f"  - scene: {_q(scene)}")
        if prompts is None:
            action = scene.replace("{", "｛").replace("}", "｝")  # braces would name characters
            lines += [f"    action: {_q(action)}", f"    framing: {framing_for(scene)}", "    setting: \"\""]
        else:
            lines.append(f"    prompt: {_q(prompts[number - 1])}")
        lines.append(f"    seed: {number}")
    return "\n".join(lines) + "\n"


def write_story_file(text: str, out: Path) -> Path:
    """Write a story file atomically, after load_story has accepted the text (a bad draft replaces nothing)."""
    with atomic_path(out, suffix=".yaml") as tmp:
        tmp.write_text(text, encoding="utf-8")
        load_story(tmp)
    return out


def default_out(scenes_file: Path) -> Path:
    """scenes.txt -> scenes.story.yaml next to it."""
    return scenes_file.with_name(f"{scenes_file.stem}.story.yaml")


def draft_story(scenes_file: str | Path, out: str | Path | None = None, base_url: str = DEFAULT_BASE_URL,
                model: str = DEFAULT_MODEL, api_key_env: str = DEFAULT_KEY_ENV, timeout: float = DEFAULT_TIMEOUT,
                force: bool = False) -> DraftResult:
    """Draft a story file from a scene list with the LLM, or from the template's rules when it cannot."""
    timeout = finite(timeout, "timeout", positive=True)  # 0 or nan would wait the client's default, or fail
    scenes_file = Path(scenes_file)
    scenes = read_scenes(scenes_file)
    out = Path(out) if out is not None else default_out(scenes_file)
    if out.exists() and not force:
        raise DraftError(f"{out} exists (your edits?); pass --force to replace it or --out another file")
    from openai import OpenAIError

    key = os.environ.get(api_key_env, "").strip()
    prompts, note = None, ""
    if not key:
        note = f"no API key in ${api_key_env}"
    else:
        try:
            prompts = ask_llm(scenes, base_url, model, key, timeout)
        except (OpenAIError, ValueError) as err:  # the endpoint or its answer failed: use the template
            note = _failure(err, base_url, api_key_env, timeout).replace(key, "***")
    title = scenes_file.stem
    if prompts is not None:
        header = (f"Drafted by {model} at {base_url} from {scenes_file.name} with the camp's template.\n"
                  "Edit the prompts freely; seeds pick the noise of each panel.")
    else:
        header = (f"Composed from the camp's template rules ({note}); edit it:\n"
                  "prompt = style，action，framing，details，setting, {name} -> the character sheet's description.")
    path = write_story_file(story_text(scenes, title, prompts, header), out)
    return DraftResult(path, "llm" if prompts is not None else "template",
                       [s.prompt for s in load_story(path).scenes], note)


__all__ = ["DEFAULT_BASE_URL", "DEFAULT_KEY_ENV", "DEFAULT_MODEL", "DraftResult", "draft_story",
           "framing_for", "parse_answer", "read_scenes", "template_prompt"]
