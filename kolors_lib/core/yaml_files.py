"""The course's one YAML reader (config files, story files, Data-Juicer recipes): bounded and strict.

A course file is small hand-written data, so the reader refuses what only a mistake or an attack
produces: files over MAX_YAML_BYTES, aliases (`&a` / `*a`: nested ones expand a few hundred bytes
into billions of values, the "billion laughs"), and duplicate keys (YAML keeps the last one and
drops the first silently). Every refusal is one line naming the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kolors_lib.core.errors import ConfigError, CourseError

MAX_YAML_BYTES = 1 << 20  # 1 MiB: the course's config is ~8 KB and a story ~2 KB


class _Refused(yaml.YAMLError):
    """A construct the course's files may not use (alias, duplicate key), with where it is."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, (mark.line + 1 if mark is not None else None)


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with duplicate keys refused."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Refuse an alias before it is resolved (the expanded value is never built)."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases (*{event.anchor}) are not allowed: write the value out",
                           event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping whose keys are all different (a repeated key would hide the first value)."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if repeated:
                raise _Refused(f"duplicate key {quote(key)} (YAML would keep only the last one)",
                               key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def quote(value: Any, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters, built without expanding a huge or deep value."""
    import reprlib

    short = reprlib.Repr()  # Python 3.11's takes no arguments
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 8, 8, 6, 6
    short.maxstring = short.maxother = short.maxlong = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_yaml_file(path: str | Path, kind: str = "config", error: type[CourseError] = ConfigError) -> Any:
    """The data in one YAML file (None for an empty one); any problem is an `error` naming the file.

    `kind` names the file in messages ("config", "story", "Data-Juicer recipe").
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise error(f"{path} is a folder: pass a {kind} YAML file")
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{path}: {size} bytes is too big for a {kind} file (at most {MAX_YAML_BYTES})")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{kind} file not found: {path}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8): pass a {kind} YAML file") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as err:
        raise error(f"{path}, line {err.line}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {' '.join(str(err).split())[:300]}") from None


__all__ = ["MAX_YAML_BYTES", "StrictLoader", "quote", "read_yaml_file"]
