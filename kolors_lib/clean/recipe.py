"""Step 02's Data-Juicer recipe: its ops by name, the raw items it runs on, and the caption rule."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.errors import FilterError
from kolors_lib.core.yaml_files import read_yaml_file

__all__ = ["RawItem", "build_caption", "load_recipe", "op_name"]

DEDUP_OPS = {"image_deduplicator": "ray_image_deduplicator"}
UNKNOWN_OP = "unknown"
_CAPTION_SPLIT = re.compile(r"[,，]")


@dataclass
class RawItem:
    """One row of the raw `metadata.jsonl`, with its image resolved inside the raw folder."""

    id: str
    image: str
    path: Path
    text: str
    source: str
    line: int


def build_caption(text: str, trigger_word: str, add_tags: list[str], remove_tags: list[str]) -> str:
    """Kohya-style caption: comma tags, removals dropped, additions appended, trigger word first."""
    trigger = (trigger_word or "").strip()
    drop = {t.strip() for t in remove_tags if t.strip()}
    tags: list[str] = []
    for piece in [*_CAPTION_SPLIT.split(text or ""), *add_tags]:
        tag = piece.strip()
        # the trigger word is placed first below, so a copy inside the caption is dropped here
        if tag and tag not in drop and tag != trigger and tag not in tags:
            tags.append(tag)
    return ", ".join([trigger, *tags] if trigger else tags)


def op_name(entry: Any) -> tuple[str, dict[str, Any]]:
    """(op name, its arguments) of one recipe `process` entry."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        name, args = next(iter(entry.items()))
        return str(name), dict(args or {})
    raise FilterError(f"recipe: each 'process' entry must be a mapping with one op name, got {entry!r}")


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a Data-Juicer recipe YAML, with errors that name the file."""
    recipe = read_yaml_file(path, "Data-Juicer recipe", FilterError)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("process"), list) or not recipe["process"]:
        raise FilterError(f"{path}: a Data-Juicer recipe needs a non-empty 'process' list")
    for entry in recipe["process"]:
        op_name(entry)
    return recipe


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file, parsed."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
