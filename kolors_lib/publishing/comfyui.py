"""ComfyUI workflows for our Kolors LoRA: write one per story scene, and check a workflow's graph.

The challenge shipped ComfyUI workflows for kijai's ComfyUI-KwaiKolorsWrapper (``DownloadAndLoadKolorsModel``
-> ``LoadKolorsLoRA`` -> ``KolorsSampler`` <- ``KolorsTextEncode`` <- ``DownloadAndLoadChatGLM3``; ``VAELoader``
+ ``VAEDecode`` -> ``PreviewImage``). The camp's ``LoadKolorsLoRA`` was a throw-away node that took the
Lightning ``.ckpt`` and an "alpha" whose meaning depended on the rank (alpha 2 on a rank-16 LoRA trained at
alpha 4 was half the training strength). :func:`write_workflow` keeps that graph, node ids and links, and
puts our own node ``KolorsStoryLoRA`` (folder ``comfyui/kolors_story_lora``, copied into
``ComfyUI/custom_nodes``) in the LoRA slot: it reads the exported ``.safetensors`` and its strength 1.0 is the
training scale alpha/rank, as everywhere in this course.

The workflow JSON is the ComfyUI front-end format (version 0.4): ``nodes`` (id, type, inputs with their
``link``, outputs with their ``links``, ``widgets_values``) and ``links`` as
``[link_id, from_node, from_slot, to_node, to_slot, type]``. :func:`validate_workflow` checks such a graph
against :data:`NODE_SPECS`, the input/output/widget declarations of these node types (from the wrapper's
``INPUT_TYPES``/``RETURN_TYPES`` and ComfyUI's core nodes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolors_lib.core.config import Config
from kolors_lib.core.errors import LoraNotFoundError, WorkflowError

WORKFLOW_VERSION = 0.4
STORY_NODE = "KolorsStoryLoRA"
SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
              "DPMSolverMultistepScheduler_SDE_karras", "UniPCMultistepScheduler", "DEISMultistepScheduler")
SEED_CONTROL = ("fixed", "increment", "decrement", "randomize")  # the front end's extra widget after a seed
STRENGTH_MEANING = "1.0 = the training scale alpha/rank: W += strength * alpha/rank * B*A"


# ---------------------------------------------------------------- what each node type declares


@dataclass(frozen=True)
class Widget:
    """One widget value: kind INT/FLOAT/STRING/COMBO, with options or a range where the node declares one."""

    name: str
    kind: str
    options: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    step: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class NodeSpec:
    """Inputs (name, type, required), outputs (name, type) and widgets of one node type, in slot order."""

    inputs: tuple[tuple[str, str, bool], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    widgets: tuple[Widget, ...] = field(default=())


_SIZE = {"min": 64, "max": 2048, "step": 64}
NODE_SPECS: dict[str, NodeSpec] = {
    # ComfyUI-KwaiKolorsWrapper (nodes.py)
    "DownloadAndLoadKolorsModel": NodeSpec(
        outputs=(("kolors_model", "KOLORSMODEL"),),
        widgets=(Widget("model", "COMBO", ("Kwai-Kolors/Kolors",)), Widget("precision", "COMBO", ("fp16",)))),
    "DownloadAndLoadChatGLM3": NodeSpec(
        outputs=(("chatglm3_model", "CHATGLM3MODEL"),),
        widgets=(Widget("precision", "COMBO", ("fp16", "quant4", "quant8")),)),
    "LoadChatGLM3": NodeSpec(
        outputs=(("chatglm3_model", "CHATGLM3MODEL"),), widgets=(Widget("chatglm3_checkpoint", "STRING"),)),
    "KolorsTextEncode": NodeSpec(
        inputs=(("chatglm3_model", "CHATGLM3MODEL", True),),
        outputs=(("kolors_embeds", "KOLORS_EMBEDS"),),
        widgets=(Widget("prompt", "STRING"), Widget("negative_prompt", "STRING"),
                 Widget("num_images_per_prompt", "INT", min=1, max=128))),
    "KolorsSampler": NodeSpec(
        inputs=(("kolors_model", "KOLORSMODEL", True), ("kolors_embeds", "KOLORS_EMBEDS", True),
                ("latent", "LATENT", False)),
        outputs=(("latent", "LATENT"),),
        widgets=(Widget("width", "INT", **_SIZE), Widget("height", "INT", **_SIZE),
                 Widget("seed", "INT", min=0, max=2**64 - 1), Widget("control_after_generate", "COMBO", SEED_CONTROL),
                 Widget("steps", "INT", min=1, max=200), Widget("cfg", "FLOAT", min=0.0, max=20.0),
                 Widget("scheduler", "COMBO", SCHEDULERS),
                 Widget("denoise_strength", "FLOAT", min=0.0, max=1.0, optional=True))),
    # the camp's throw-away LoRA node (a Lightning .ckpt path and a rank-dependent "alpha")
    "LoadKolorsLoRA": NodeSpec(
        inputs=(("kolors_model", "KOLORSMODEL", True),), outputs=(("kolors_model", "KOLORSMODEL"),),
        widgets=(Widget("lora_path", "STRING"), Widget("lora_alpha", "FLOAT", min=0.0, max=4.0))),
    # ours: comfyui/kolors_story_lora
    STORY_NODE: NodeSpec(
        inputs=(("kolors_model", "KOLORSMODEL", True),), outputs=(("kolors_model", "KOLORSMODEL"),),
        widgets=(Widget("lora_file", "STRING"), Widget("strength", "FLOAT", min=-4.0, max=4.0))),
    # ComfyUI core
    "VAELoader": NodeSpec(outputs=(("VAE", "VAE"),), widgets=(Widget("vae_name", "STRING"),)),
    "VAEDecode": NodeSpec(inputs=(("samples", "LATENT", True), ("vae", "VAE", True)), outputs=(("IMAGE", "IMAGE"),)),
    "PreviewImage": NodeSpec(inputs=(("images", "IMAGE", True),)),
    "SaveImage": NodeSpec(inputs=(("images", "IMAGE", True),), widgets=(Widget("filename_prefix", "STRING"),)),
    "Note": NodeSpec(widgets=(Widget("text", "STRING"),)),
}


# ---------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _widget_problem(widget: Widget, value: Any) -> str | None:
    """Why `value` is not a valid value of `widget`, or None."""
    if widget.kind == "INT":
        if not _is_int(value):
            return f"expected an integer, got {value!r}"
    elif widget.kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a number, got {value!r}"
    elif widget.kind == "STRING":
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
    elif widget.kind == "COMBO":
        if value not in widget.options:
            return f"{value!r} is not one of {', '.join(map(repr, widget.options))}"
    if widget.min is not None and value < widget.min or widget.max is not None and value > widget.max:
        return f"{value!r} is outside [{widget.min}, {widget.max}]"
    if widget.step and value % widget.step:
        return f"{value!r} is not a multiple of {widget.step}"
    return None


def _check_widgets(where: str, spec: NodeSpec, node: Mapping[str, Any]) -> list[str]:
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        return [f"{where}: widgets_values must be a list, not {type(values).__name__}"]
    required = sum(1 for w in spec.widgets if not w.optional)
    if not required <= len(values) <= len(spec.widgets):
        names = ", ".join(w.name + ("?" if w.optional else "") for w in spec.widgets) or "none"
        count = required if required == len(spec.widgets) else f"{required}..{len(spec.widgets)}"
        return [f"{where}: {len(values)} widget value(s), expected {count} ({names})"]
    errors = []
    for widget, value in zip(spec.widgets, values, strict=False):
        problem = _widget_problem(widget, value)
        if problem:
            errors.append(f"{where}: widget {widget.name!r}: {problem}")
    return errors


def _index_nodes(nodes: list[Any], errors: list[str]) -> dict[int, Mapping[str, Any]]:
    """Nodes by id; ids that are missing or used twice are reported."""
    by_id: dict[int, Mapping[str, Any]] = {}
    for node in nodes:
        nid = node.get("id") if isinstance(node, Mapping) else None
        if not _is_int(nid):
            errors.append(f"node without an integer id: {node!r:.80}")
        elif nid in by_id:
            errors.append(f"node id {nid} is used twice")
        else:
            by_id[nid] = node
    return by_id


def _index_links(links: list[Any], errors: list[str]) -> dict[int, list[Any]]:
    """Links by id; malformed links and ids used twice are reported."""
    table: dict[int, list[Any]] = {}
    for link in links:
        if not (isinstance(link, list) and len(link) == 6 and all(_is_int(v) for v in link[:5])
                and isinstance(link[5], str)):
            errors.append(f"link {link!r}: expected [link_id, from_node, from_slot, to_node, to_slot, type]")
        elif link[0] in table:
            errors.append(f"link id {link[0]} is used twice")
        else:
            table[link[0]] = link
    return table


def _check_inputs(where: str, nid: int, spec: NodeSpec, node: Mapping[str, Any],
                  table: Mapping[int, list[Any]]) -> list[str]:
    """A node's declared inputs against its type, and each input's link against the links table."""
    errors: list[str] = []
    declared_in = {name: (typ, req) for name, typ, req in spec.inputs}
    widget_names = {w.name: w for w in spec.widgets}
    seen_inputs = set()
    for slot, inp in enumerate(node.get("inputs") or []):
        name, typ, link_id = inp.get("name"), inp.get("type"), inp.get("link")
        seen_inputs.add(name)
        if name in declared_in:
            if typ != declared_in[name][0]:
                errors.append(f"{where}: input {name!r} is declared {typ!r}, the node type takes "
                              f"{declared_in[name][0]!r}")
        elif not (inp.get("widget") and name in widget_names):  # a widget converted to an input is fine
            errors.append(f"{where}: unknown input {name!r} (the node type has "
                          f"{', '.join(declared_in) or 'no inputs'})")
        if link_id is not None:
            end = _link_end(table, link_id, 3)
            if end is None:
                errors.append(f"{where}: input {name!r} refers to link {link_id}, which does not exist")
            elif end != (nid, slot):
                errors.append(f"{where}: input {name!r} (slot {slot}) refers to link {link_id}, which goes "
                              f"to node {end[0]} slot {end[1]}")
        elif declared_in.get(name, ("", False))[1]:
            errors.append(f"{where}: required input {name!r} is not linked")
    for name, (_, required) in declared_in.items():
        if required and name not in seen_inputs:
            errors.append(f"{where}: required input {name!r} is missing")
    return errors


def _link_end(table: Mapping[int, list[Any]], link_id: Any, at: int) -> tuple[Any, Any] | None:
    """(node, slot) at one end of a link (at=1: its source, at=3: its target); None for an unknown link."""
    link = table.get(link_id)
    return None if link is None else (link[at], link[at + 1])


def _check_outputs(where: str, nid: int, spec: NodeSpec, node: Mapping[str, Any],
                   table: Mapping[int, list[Any]]) -> list[str]:
    """A node's declared outputs against its type, and each listed link against the links table."""
    errors: list[str] = []
    outputs = node.get("outputs") or []
    if len(outputs) > len(spec.outputs):
        errors.append(f"{where}: {len(outputs)} outputs, the node type has {len(spec.outputs)}")
    for slot, (out, (name, typ)) in enumerate(zip(outputs, spec.outputs, strict=False)):
        if out.get("type") != typ:
            errors.append(f"{where}: output {slot} is declared {out.get('type')!r}, the node type gives {typ!r}")
        for link_id in out.get("links") or []:
            end = _link_end(table, link_id, 1)
            if end is None:
                errors.append(f"{where}: output {name!r} lists link {link_id}, which does not exist")
            elif end != (nid, slot):
                errors.append(f"{where}: output {name!r} (slot {slot}) lists link {link_id}, which comes from "
                              f"node {end[0]} slot {end[1]}")
    return errors


def _check_link_source(where: str, link_id: int, src: int, src_slot: int, typ: str,
                       by_id: Mapping[int, Mapping[str, Any]], spec: NodeSpec) -> list[str]:
    """The link's source slot exists, gives the link's type, and lists the link."""
    outs = spec.outputs
    if not 0 <= src_slot < len(outs):
        return [f"{where}: {by_id[src].get('type')} has no output slot {src_slot}"]
    if outs[src_slot][1] != typ:
        return [f"{where}: {by_id[src].get('type')} output {src_slot} gives {outs[src_slot][1]!r}, not {typ!r}"]
    listed = (by_id[src].get("outputs") or [{}] * (src_slot + 1))
    if src_slot >= len(listed) or link_id not in (listed[src_slot].get("links") or []):
        return [f"{where}: node {src} does not list the link on output {src_slot}"]
    return []


def _check_link_target(where: str, link_id: int, dst: int, dst_slot: int, typ: str,
                       by_id: Mapping[int, Mapping[str, Any]], spec: NodeSpec) -> list[str]:
    """The link's target slot exists, takes the link's type, and holds the link."""
    ins = by_id[dst].get("inputs") or []
    if not 0 <= dst_slot < len(ins):
        return [f"{where}: node {dst} has no input slot {dst_slot}"]
    errors = []
    name = ins[dst_slot].get("name")
    want = {n: t for n, t, _ in spec.inputs}.get(name, ins[dst_slot].get("type"))
    if want != typ:
        errors.append(f"{where}: {by_id[dst].get('type')} input {name!r} takes {want!r}, not {typ!r}")
    if ins[dst_slot].get("link") != link_id:
        errors.append(f"{where}: node {dst} input {name!r} holds link {ins[dst_slot].get('link')}")
    return errors


def _check_links(table: Mapping[int, list[Any]], by_id: Mapping[int, Mapping[str, Any]],
                 specs: Mapping[int, NodeSpec]) -> list[str]:
    """Every link's endpoints exist and agree with the nodes at both ends."""
    errors: list[str] = []
    for link_id, (_, src, src_slot, dst, dst_slot, typ) in table.items():
        where = f"link {link_id} ({src}:{src_slot} -> {dst}:{dst_slot}, {typ})"
        errors += [f"{where}: node {end} does not exist" for end in (src, dst) if end not in by_id]
        if src in specs:
            errors += _check_link_source(where, link_id, src, src_slot, typ, by_id, specs[src])
        if dst in specs:
            errors += _check_link_target(where, link_id, dst, dst_slot, typ, by_id, specs[dst])
    return errors


def validate_workflow(data: Any) -> list[str]:
    """Problems of a ComfyUI workflow graph (front-end JSON); an empty list means it checks out.

    Checks: unique node/link ids within last_node_id/last_link_id; known node types; each node's declared
    inputs/outputs match its type's names and types; every link's endpoints exist, both ends' slot types
    equal the link type, and the nodes' ``link``/``links`` fields agree with the links table; every required
    input is linked; widget value counts, types, options and ranges per node type.
    """
    if not isinstance(data, Mapping):
        return [f"a workflow is a JSON object, not {type(data).__name__}"]
    nodes, links = data.get("nodes"), data.get("links")
    if not isinstance(nodes, list) or not isinstance(links, list):
        return ["a workflow needs a 'nodes' list and a 'links' list"]
    errors: list[str] = []
    by_id = _index_nodes(nodes, errors)
    table = _index_links(links, errors)
    for key, ids in (("last_node_id", by_id), ("last_link_id", table)):
        last = data.get(key)
        if not _is_int(last) or (ids and last < max(ids)):
            errors.append(f"{key} is {last!r} but the highest id in use is {max(ids) if ids else None}")
    specs: dict[int, NodeSpec] = {}
    for nid, node in by_id.items():
        kind = node.get("type")
        where = f"node {nid} ({kind})"
        spec = NODE_SPECS.get(kind)
        if spec is None:
            errors.append(f"{where}: unknown node type (known: {', '.join(sorted(NODE_SPECS))})")
            continue
        specs[nid] = spec
        errors += _check_inputs(where, nid, spec, node, table)
        errors += _check_outputs(where, nid, spec, node, table)
        errors += _check_widgets(where, spec, node)
    return errors + _check_links(table, by_id, specs)


# ---------------------------------------------------------------- building our workflow


def _node(nid: int, kind: str, pos: tuple[int, int], size: tuple[float, float], order: int,
          inputs: Sequence[tuple[str, int | None]] = (), links_out: Sequence[list[int]] = (),
          widgets: Sequence[Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One node in the front end's JSON shape; input/output names and types come from NODE_SPECS."""
    spec = NODE_SPECS[kind]
    types = {name: typ for name, typ, _ in spec.inputs}
    node: dict[str, Any] = {"id": nid, "type": kind, "pos": list(pos), "size": {"0": size[0], "1": size[1]},
                            "flags": {}, "order": order, "mode": 0}
    if inputs:
        node["inputs"] = [{"name": name, "type": types[name], "link": link} for name, link in inputs]
    if spec.outputs:
        node["outputs"] = [{"name": name, "type": typ, "links": list(links), "shape": 3, "slot_index": slot}
                           for slot, ((name, typ), links) in enumerate(zip(spec.outputs, links_out, strict=True))]
    node["properties"] = {"Node name for S&R": kind} if kind != "Note" else {"text": ""}
    if widgets is not None:
        node["widgets_values"] = list(widgets)
    node.update(extra)
    return node


def build_workflow(*, prompt: str, negative: str, seed: int, steps: int, cfg_scale: float, width: int, height: int,
                   lora_name: str, strength: float, note: str = "", save_prefix: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The challenge's Kolors + LoRA graph (same node ids and links) with our LoRA node and values.

    `save_prefix` given: a SaveImage node writes the panel; None: a PreviewImage, as in the challenge's file.
    """
    for name, text in (("prompt", prompt), ("negative prompt", negative)):
        if "|" in text or "{" in text:
            raise WorkflowError(f"the {name} holds '|' or '{{': KolorsTextEncode reads '|' as a batch separator "
                                f"and '{{a|b}}' as a random choice; remove them: {text!r}")
    image_node = (_node(3, "SaveImage", (1366, 469), (535.4, 562.2), 8, [("images", 13)], widgets=[save_prefix])
                  if save_prefix else _node(3, "PreviewImage", (1366, 469), (535.4, 562.2), 8, [("images", 13)]))
    nodes = [
        _node(11, "VAELoader", (1323, 240), (315, 58), 0, links_out=[[12]], widgets=["sdxl.vae.safetensors"]),
        _node(10, "VAEDecode", (1368, 369), (210, 46), 7, [("samples", 18), ("vae", 12)], links_out=[[13]]),
        _node(15, "Note", (200, 636), (273.5, 149.6), 1, widgets=[note], color="#432", bgcolor="#653"),
        _node(13, "DownloadAndLoadChatGLM3", (206, 522), (274.5, 58), 2, links_out=[[14]], widgets=["fp16"]),
        _node(6, "DownloadAndLoadKolorsModel", (201, 368), (315, 82), 3, links_out=[[19]],
              widgets=["Kwai-Kolors/Kolors", "fp16"]),
        _node(12, "KolorsTextEncode", (519, 529), (457.3, 225.3), 4, [("chatglm3_model", 14)], links_out=[[17]],
              widgets=[prompt, negative, 1]),
        image_node,
        _node(16, STORY_NODE, (606, 368), (317.4, 82), 5, [("kolors_model", 19)], links_out=[[20]],
              widgets=[lora_name, float(strength)]),
        _node(14, "KolorsSampler", (1011, 371), (315, 266), 6,
              [("kolors_model", 20), ("kolors_embeds", 17), ("latent", None)], links_out=[[18]],
              widgets=[int(width), int(height), int(seed), "fixed", int(steps), float(cfg_scale),
                       "EulerDiscreteScheduler", 1.0]),
    ]
    links = [[12, 11, 0, 10, 1, "VAE"], [13, 10, 0, 3, 0, "IMAGE"], [14, 13, 0, 12, 0, "CHATGLM3MODEL"],
             [17, 12, 0, 14, 1, "KOLORS_EMBEDS"], [18, 14, 0, 10, 0, "LATENT"], [19, 6, 0, 16, 0, "KOLORSMODEL"],
             [20, 16, 0, 14, 0, "KOLORSMODEL"]]
    data = {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max(link[0] for link in links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": {"0": -180, "1": -200}}, **(extra or {})},
            "version": WORKFLOW_VERSION}
    errors = validate_workflow(data)
    if errors:
        raise WorkflowError("the workflow does not check out: " + "; ".join(errors))
    return data


def _note(trigger: str, strength: float, lora_name: str) -> str:
    return (f"Kolors story LoRA: {lora_name}\n"
            "Install: copy comfyui/kolors_story_lora into ComfyUI/custom_nodes (needs ComfyUI-KwaiKolorsWrapper) "
            "and the LoRA file into ComfyUI/models/loras.\n"
            f"Strength {strength:g}: {STRENGTH_MEANING}. (The camp's LoadKolorsLoRA 'alpha 2' on a rank-16 LoRA "
            "trained at alpha 4 was 0.5 here.)\n"
            f"Trigger word: {trigger or '(none)'}.\n"
            "Same prompt/seed/steps/cfg/size as the course's storyboard; the wrapper samples with "
            "EulerDiscreteScheduler on its own device, so pixels differ from the course's panels.")


def write_workflow(cfg: Config, lora_file: Path, dest: Path, scene_index: int = 0, strength: float | None = None,
                   story_path: Path | None = None, lora_name: str | None = None,
                   save_prefix: str | None = "kolors_story/scene") -> Path:
    """Write the ComfyUI workflow of one story scene with our LoRA; returns the JSON file written.

    Values are those of our storyboard run under `cfg`: the scene's prompt with the trigger word first
    (``"<trigger>, <prompt>"`` when ``generate.add_trigger_word``), the story's negative prompt, the scene's
    seed, steps/cfg/size from :func:`kolors_lib.storyboard.storyboard.render_settings` and ``generate.strength`` unless
    `strength` is given. The LoRA widget holds `lora_name` or the file's name (ComfyUI lists files of its
    ``models/loras`` folder by name). `dest`: a ``.json`` file, or a folder to write
    ``kolors_story_scene01.comfyui.json`` into.
    """
    from kolors_lib.core.files import sha256_file, write_json
    from kolors_lib.kolors.lora import detect_format, load_lora
    from kolors_lib.kolors.story import load_story, render_settings, with_trigger

    lora_file, dest = Path(lora_file), Path(dest)
    if not lora_file.is_file():
        raise LoraNotFoundError(f"LoRA file not found: {lora_file} (export it first: export_lora)")
    story = load_story(story_path or cfg.generate.story)
    if not 0 <= scene_index < len(story.scenes):
        raise WorkflowError(f"scene_index {scene_index} is outside 0..{len(story.scenes) - 1}")
    scene = story.scenes[scene_index]
    settings = render_settings(cfg, story)
    strength = float(cfg.generate.strength if strength is None else strength)
    trigger = cfg.filter.trigger_word if cfg.generate.add_trigger_word else ""
    state, _ = load_lora(lora_file)
    name = lora_name or lora_file.name
    number = scene_index + 1
    info = {"scene": number, "scene_title": scene.scene, "story": story.title, "lora_file": name,
            "lora_format": detect_format(state), "lora_sha256": sha256_file(lora_file), "strength": strength,
            "strength_meaning": STRENGTH_MEANING, "trigger_word": trigger or None, "node": STORY_NODE}
    data = build_workflow(
        prompt=with_trigger(scene.prompt, trigger), negative=settings.negative, seed=scene.seed,
        steps=settings.steps, cfg_scale=settings.cfg_scale, width=settings.width, height=settings.height,
        lora_name=name, strength=strength, note=_note(trigger, strength, name),
        save_prefix=f"{save_prefix}{number:02d}" if save_prefix else None, extra={"kolors_story": info})
    if dest.is_dir() or dest.suffix != ".json":
        dest = dest / f"kolors_story_scene{number:02d}.comfyui.json"
    return write_json(data, dest)
