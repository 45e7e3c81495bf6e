"""Story files with a character sheet: one rule composes a scene's prompt from its parts (step 04).

A scene of `story.yaml` is either a finished `prompt:` (as before) or described by its parts, with
a `style` line and a character sheet (`characters`: name -> fixed description) at the top level::

    style: 古风，水墨画
    characters:
      少女: 黑色长发少女
    scenes:
      - scene: 女主正在上课
        characters: [少女]
        action: 一个{少女}，坐在古代书院的教室里，认真听讲
        framing: 上半身          # 全身 or 上半身 (the camp's rule: one of the two per scene)
        details: 绿色长裙        # optional: clothes, props of this panel
        setting: 背景有木质桌椅和古书架   # optional
        seed: 1

The one rule (`compose_prompt`)::

    prompt = "，".join(part for part in (style, action, framing, details, setting) if part)

where every `{name}` in action, details and setting is replaced by the sheet's description of
`name`: a character written as `{少女}` reads the same in every panel. A scene's `characters`
list (optional; derived from the `{name}`s when left out) must name sheet characters, and each
one listed must be placed in the text as `{name}`, so the list never disagrees with the prompt.
"""

from __future__ import annotations

import re
from typing import Any

from kolors_lib.core.yaml_files import quote

FRAMINGS = ("全身", "上半身")
SEP = "，"  # the camp's prompts join their parts with a full-width comma
STORY_KEYS = ("style", "characters")  # top-level keys this module adds to the story file
SCENE_KEYS = ("characters", "action", "framing", "details", "setting")  # parts of a structured scene
_TEXT_PARTS = ("action", "details", "setting")  # where {name} is replaced
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def placeholders(text: str) -> list[str]:
    """The character names written as {name} in `text`, in order of first use."""
    return list(dict.fromkeys(name.strip() for name in _PLACEHOLDER.findall(text)))


def fill(text: str, sheet: dict[str, str]) -> str:
    """`text` with every {name} replaced by sheet[name] (KeyError for a name not on the sheet)."""
    return _PLACEHOLDER.sub(lambda m: sheet[m.group(1).strip()], text)


def compose_prompt(style: str, sheet: dict[str, str], action: str, framing: str, details: str = "",
                   setting: str = "") -> str:
    """The one rule: style，action，framing，details，setting (empty parts left out), {name} -> sheet[name]."""
    parts = (style, fill(action, sheet), framing, fill(details, sheet), fill(setting, sheet))
    return SEP.join(p.strip() for p in parts if p and p.strip())


def is_structured(scene: dict[str, Any]) -> bool:
    """True when a scene is described by parts (action, framing, ...) rather than a finished prompt."""
    return any(key in scene for key in SCENE_KEYS)


def _text(value: Any) -> str | None:
    """A YAML value as stripped text; None when it is not text (a number or a list is a mistake)."""
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else None


def _sheet(raw: dict[str, Any], problems: list[str]) -> dict[str, str]:
    """The character sheet, checked: a mapping of names to non-empty descriptions."""
    value = raw.get("characters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append("'characters' must be a mapping name: description (the character sheet)")
        return {}
    sheet = {}
    for name, text in value.items():
        if not isinstance(text, str) or not text.strip():
            problems.append(f"character {name}: the description must be non-empty text")
        elif "{" in text or "}" in text:
            problems.append(f"character {name}: a description cannot contain {{ or }}")
        else:
            sheet[str(name).strip()] = text.strip()
    return sheet


def _compose_scene(scene: dict[str, Any], where: str, style: str, sheet: dict[str, str],
                   problems: list[str]) -> str:
    """One structured scene's prompt; problems found are appended as 'scene N: ...'."""
    if "prompt" in scene:
        problems.append(f"{where}: give either a finished prompt or its parts ({', '.join(SCENE_KEYS)}), not both")
    texts = {}
    for key in _TEXT_PARTS:
        text = _text(scene.get(key))
        if text is None:
            problems.append(f"{where}: {key} must be text, not {quote(scene.get(key))}")
        texts[key] = text or ""
    if not texts["action"]:
        problems.append(f"{where}: action is empty or missing (who does what)")
    framing = scene.get("framing")
    if framing not in FRAMINGS:
        problems.append(f"{where}: framing must be {' or '.join(FRAMINGS)}, not {quote(framing)}")
        framing = ""
    used = list(dict.fromkeys(n for key in _TEXT_PARTS for n in placeholders(texts[key])))
    listed = scene.get("characters", used)
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        problems.append(f"{where}: characters must be a list of names from the character sheet")
        listed = used
    known = ", ".join(sheet) or "the sheet is empty"
    unknown = [n for n in dict.fromkeys([*listed, *used]) if n not in sheet]
    if unknown:
        problems.append(f"{where}: unknown character(s) {', '.join(unknown)} (character sheet: {known})")
    unplaced = [n for n in listed if n in sheet and n not in used]
    if unplaced:
        problems.append(f"{where}: character(s) {', '.join(unplaced)} listed but not placed in the action as "
                        + ", ".join(f"{{{n}}}" for n in unplaced))
    unlisted = [n for n in used if n in sheet and n not in listed]
    if unlisted:
        problems.append(f"{where}: {', '.join(f'{{{n}}}' for n in unlisted)} used but not in characters")
    safe = {**{n: f"{{{n}}}" for n in unknown}, **sheet}  # unknown names stay visible in the text
    return compose_prompt(style, safe, texts["action"], str(framing), texts["details"], texts["setting"])


def compose_story(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of a story mapping whose structured scenes carry their composed `prompt`, and the problems found.

    Plain `prompt:` scenes are left as they are. Problems read 'scene N: ...' (numbered from 1).
    """
    problems: list[str] = []
    out = dict(raw)
    style = _text(raw.get("style"))
    if style is None:
        problems.append(f"style must be text, not {quote(raw.get('style'))}")
        style = ""
    sheet = _sheet(raw, problems)
    scenes = raw.get("scenes")
    if not isinstance(scenes, list):
        return out, problems
    composed = []
    for number, scene in enumerate(scenes, start=1):
        if isinstance(scene, dict) and is_structured(scene):
            scene = {**scene, "prompt": _compose_scene(scene, f"scene {number}", style, sheet, problems)}
        composed.append(scene)
    out["scenes"] = composed
    return out, problems


__all__ = ["FRAMINGS", "SCENE_KEYS", "STORY_KEYS", "compose_prompt", "compose_story", "fill", "is_structured",
           "placeholders"]
