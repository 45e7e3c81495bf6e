"""ComfyUI: the workflow we write checks out like the challenge's own, and our custom node merges the LoRA
into the wrapper's KOLORSMODEL exactly as DiffSynth's UNet with the same LoRA merged (strength 1.0 = training)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import load_config
from kolors_lib.core.errors import WorkflowError
from kolors_lib.kolors.lora import export_lora, merge_lora, module_map, save_lora
from kolors_lib.kolors.story import load_story, render_settings
from kolors_lib.publishing.comfyui import NODE_SPECS, build_workflow, validate_workflow, write_workflow

patch_torchvision()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NODE_DIR = Path(__file__).resolve().parents[1] / "comfyui" / "kolors_story_lora"
RANK, ALPHA = 4, 2.0
META = {"rank": RANK, "alpha": ALPHA, "base_model": "Kwai-Kolors/Kolors", "trigger_word": "kstory"}
TARGETS = ("to_q", "to_k", "to_v", "to_out")

# The challenge's comfyui_kolors_with_lora_example.json, trimmed to what the graph needs (no layout fields).
CHALLENGE_WORKFLOW = json.loads("""
{"last_node_id": 16, "last_link_id": 20,
 "nodes": [
  {"id": 11, "type": "VAELoader", "outputs": [{"name": "VAE", "type": "VAE", "links": [12], "shape": 3}],
   "widgets_values": ["sdxl.vae.safetensors"]},
  {"id": 10, "type": "VAEDecode",
   "inputs": [{"name": "samples", "type": "LATENT", "link": 18}, {"name": "vae", "type": "VAE", "link": 12,
               "slot_index": 1}],
   "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [13], "shape": 3, "slot_index": 0}]},
  {"id": 15, "type": "Note", "properties": {"text": ""}, "widgets_values": ["Text encoding takes the most VRAM"]},
  {"id": 13, "type": "DownloadAndLoadChatGLM3",
   "outputs": [{"name": "chatglm3_model", "type": "CHATGLM3MODEL", "links": [14], "shape": 3}],
   "widgets_values": ["fp16"]},
  {"id": 6, "type": "DownloadAndLoadKolorsModel",
   "outputs": [{"name": "kolors_model", "type": "KOLORSMODEL", "links": [19], "shape": 3, "slot_index": 0}],
   "widgets_values": ["Kwai-Kolors/Kolors", "fp16"]},
  {"id": 12, "type": "KolorsTextEncode",
   "inputs": [{"name": "chatglm3_model", "type": "CHATGLM3MODEL", "link": 14, "slot_index": 0}],
   "outputs": [{"name": "kolors_embeds", "type": "KOLORS_EMBEDS", "links": [17], "shape": 3, "slot_index": 0}],
   "widgets_values": ["二次元,长发,少女,白色背景", "", 1]},
  {"id": 3, "type": "PreviewImage", "inputs": [{"name": "images", "type": "IMAGE", "link": 13}]},
  {"id": 16, "type": "LoadKolorsLoRA", "inputs": [{"name": "kolors_model", "type": "KOLORSMODEL", "link": 19}],
   "outputs": [{"name": "kolors_model", "type": "KOLORSMODEL", "links": [20], "shape": 3, "slot_index": 0}],
   "widgets_values": ["/mnt/workspace/models/lightning_logs/version_0/checkpoints/epoch=0-step=500.ckpt", 2]},
  {"id": 14, "type": "KolorsSampler",
   "inputs": [{"name": "kolors_model", "type": "KOLORSMODEL", "link": 20},
              {"name": "kolors_embeds", "type": "KOLORS_EMBEDS", "link": 17},
              {"name": "latent", "type": "LATENT", "link": null}],
   "outputs": [{"name": "latent", "type": "LATENT", "links": [18], "shape": 3, "slot_index": 0}],
   "widgets_values": [1024, 1024, 0, "fixed", 25, 5, "EulerDiscreteScheduler", 1]}],
 "links": [[12, 11, 0, 10, 1, "VAE"], [13, 10, 0, 3, 0, "IMAGE"], [14, 13, 0, 12, 0, "CHATGLM3MODEL"],
           [17, 12, 0, 14, 1, "KOLORS_EMBEDS"], [18, 14, 0, 10, 0, "LATENT"], [19, 6, 0, 16, 0, "KOLORSMODEL"],
           [20, 16, 0, 14, 0, "KOLORSMODEL"]],
 "groups": [], "config": {}, "extra": {}, "version": 0.4}
""")


def _without_lora(data: dict) -> dict:
    """The challenge's comfyui_kolors_example.json shape: no LoRA node, a 7-value (older) KolorsSampler."""
    data = copy.deepcopy(data)
    data["nodes"] = [n for n in data["nodes"] if n["id"] != 16]
    sampler = next(n for n in data["nodes"] if n["id"] == 14)
    sampler["inputs"] = sampler["inputs"][:2]
    sampler["inputs"][0]["link"] = 16
    sampler["widgets_values"] = [1024, 1024, 1000102404233412, "fixed", 25, 5, "EulerDiscreteScheduler"]
    next(n for n in data["nodes"] if n["id"] == 6)["outputs"][0]["links"] = [16]
    data["links"] = [link for link in data["links"] if link[0] not in (19, 20)] + [[16, 6, 0, 14, 0, "KOLORSMODEL"]]
    data["last_node_id"], data["last_link_id"] = 15, 18
    return data


# ---------------------------------------------------------------- the workflow


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    return load_config(profile="tiny", workdir=tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def small_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (tiny, not UNet-sized) LoRA in our diffusers naming: the workflow only names the file."""
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{module}.lora_A.weight": torch.zeros(RANK, 8), f"{module}.lora_B.weight": torch.zeros(8, RANK)}
    return save_lora(state, tmp_path_factory.mktemp("lora") / "story_lora.diffusers.safetensors",
                     {**META, "format": "diffusers"})


def _by_type(data: dict) -> dict[str, dict]:
    return {n["type"]: n for n in data["nodes"]}


def test_the_challenge_workflows_validate() -> None:
    assert validate_workflow(CHALLENGE_WORKFLOW) == []
    assert validate_workflow(_without_lora(CHALLENGE_WORKFLOW)) == []


def test_written_workflow_matches_the_template_and_our_values(cfg, small_lora: Path, tmp_path: Path) -> None:
    path = write_workflow(cfg, small_lora, tmp_path)
    assert path == tmp_path / "kolors_story_scene01.comfyui.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert validate_workflow(data) == []
    nodes = _by_type(data)
    challenge = {n["type"] for n in CHALLENGE_WORKFLOW["nodes"]}
    assert set(nodes) == challenge - {"LoadKolorsLoRA", "PreviewImage"} | {"KolorsStoryLoRA", "SaveImage"}
    assert data["links"] == CHALLENGE_WORKFLOW["links"], "same links: ids, slots, types"
    assert (data["last_node_id"], data["last_link_id"]) == (16, 20)
    assert nodes["KolorsStoryLoRA"]["id"] == 16

    story = load_story(cfg.generate.story)
    settings = render_settings(cfg, story)
    scene = story.scenes[0]
    assert nodes["KolorsTextEncode"]["widgets_values"] == [f"kstory, {scene.prompt}", story.negative, 1]
    assert nodes["KolorsStoryLoRA"]["widgets_values"] == ["story_lora.diffusers.safetensors", 1.0]
    assert nodes["KolorsSampler"]["widgets_values"] == [settings.width, settings.height, scene.seed, "fixed",
                                                        settings.steps, settings.cfg_scale,
                                                        "EulerDiscreteScheduler", 1.0]
    assert nodes["SaveImage"]["widgets_values"] == ["kolors_story/scene01"]
    info = data["extra"]["kolors_story"]
    assert info["lora_format"] == "diffusers" and info["strength"] == 1.0 and len(info["lora_sha256"]) == 64


def test_scene_strength_and_name_are_taken(cfg, small_lora: Path, tmp_path: Path) -> None:
    path = write_workflow(cfg, small_lora, tmp_path / "w.json", scene_index=3, strength=0.5,
                          lora_name="mine.safetensors", save_prefix=None)
    nodes = _by_type(json.loads(path.read_text(encoding="utf-8")))
    story = load_story(cfg.generate.story)
    assert nodes["KolorsSampler"]["widgets_values"][2] == story.scenes[3].seed == 4
    assert nodes["KolorsTextEncode"]["widgets_values"][0] == f"kstory, {story.scenes[3].prompt}"
    assert nodes["KolorsStoryLoRA"]["widgets_values"] == ["mine.safetensors", 0.5]
    assert "PreviewImage" in nodes and "SaveImage" not in nodes
    with pytest.raises(WorkflowError, match="scene_index"):
        write_workflow(cfg, small_lora, tmp_path, scene_index=8)
    with pytest.raises(FileNotFoundError):
        write_workflow(cfg, tmp_path / "nope.safetensors", tmp_path)


def test_prompt_with_a_bar_is_refused() -> None:
    with pytest.raises(WorkflowError, match="batch separator"):
        build_workflow(prompt="a | b", negative="", seed=1, steps=4, cfg_scale=4.0, width=128, height=128,
                       lora_name="x.safetensors", strength=1.0)


def _corrupt(how: str) -> dict:
    data = copy.deepcopy(CHALLENGE_WORKFLOW)
    nodes = {n["id"]: n for n in data["nodes"]}
    if how == "dangling":  # the ChatGLM loader is gone but its link stays
        data["nodes"] = [n for n in data["nodes"] if n["id"] != 13]
    elif how == "wrong_slot":  # the text embeds plugged into the model slot
        data["links"][3] = [17, 12, 0, 14, 0, "KOLORS_EMBEDS"]
    elif how == "wrong_type":
        data["links"][3][5] = "LATENT"
        nodes[14]["inputs"][0]["type"] = "LATENT"
    elif how == "unlinked":
        nodes[14]["inputs"][1]["link"] = None
        data["links"] = [link for link in data["links"] if link[0] != 17]
        nodes[12]["outputs"][0]["links"] = []
    elif how == "widgets":
        nodes[14]["widgets_values"][2] = "zero"
        nodes[14]["widgets_values"][6] = "DDIMScheduler"
        nodes[16]["widgets_values"] = ["x.ckpt"]
    elif how == "ids":
        data["last_link_id"] = 5
        data["nodes"].append({"id": 99, "type": "KSamplerAdvanced"})
    return data


@pytest.mark.parametrize(("how", "expected"), [
    ("dangling", ["link 14 (13:0 -> 12:0, CHATGLM3MODEL): node 13 does not exist"]),
    ("wrong_slot", ["KolorsSampler input 'kolors_model' takes 'KOLORSMODEL', not 'KOLORS_EMBEDS'"]),
    ("wrong_type", ["KolorsTextEncode output 0 gives 'KOLORS_EMBEDS', not 'LATENT'",
                    "KolorsSampler input 'kolors_embeds' takes 'KOLORS_EMBEDS', not 'LATENT'",
                    "input 'kolors_model' is declared 'LATENT', the node type takes 'KOLORSMODEL'"]),
    ("unlinked", ["node 14 (KolorsSampler): required input 'kolors_embeds' is not linked"]),
    ("widgets", ["widget 'seed': expected an integer", "widget 'scheduler': 'DDIMScheduler' is not one of",
                 "node 16 (LoadKolorsLoRA): 1 widget value(s), expected 2"]),
    ("ids", ["last_link_id is 5", "node 99 (KSamplerAdvanced): unknown node type"]),
])
def test_corrupted_workflows_give_errors(how: str, expected: list[str]) -> None:
    errors = validate_workflow(_corrupt(how))
    for text in expected:
        assert any(text in e for e in errors), (text, errors)


def test_validator_knows_every_node_it_writes() -> None:
    data = build_workflow(prompt="p", negative="n", seed=1, steps=4, cfg_scale=4.0, width=128, height=128,
                          lora_name="x.safetensors", strength=1.0)
    assert {n["type"] for n in data["nodes"]} <= set(NODE_SPECS)
    assert validate_workflow([]) and validate_workflow({"nodes": {}})


# ---------------------------------------------------------------- the custom node


def load_node_package(name: str = "kolors_story_lora_under_test") -> types.ModuleType:
    """Import comfyui/kolors_story_lora from its folder, the way ComfyUI imports a custom node."""
    spec = importlib.util.spec_from_file_location(name, NODE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(NODE_DIR)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    finally:
        sys.modules.pop(name, None)
    return package


@pytest.fixture(scope="module")
def node_mod() -> types.ModuleType:
    package = load_node_package()
    assert set(package.NODE_CLASS_MAPPINGS) == {"KolorsStoryLoRA"}
    assert package.NODE_DISPLAY_NAME_MAPPINGS["KolorsStoryLoRA"] == "Load Kolors Story LoRA"
    return sys.modules[package.NODE_CLASS_MAPPINGS["KolorsStoryLoRA"].__module__]


@pytest.fixture(scope="module")
def diffsynth_unet(tiny_unet_root: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from kolors_lib.kolors.models import load_model_manager

    manager = load_model_manager([tiny_unet_root / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"])
    unet = manager.fetch_model("sdxl_unet").eval()
    return unet, {k: v.clone() for k, v in unet.state_dict().items()}


def run_diffsynth(unet: torch.nn.Module, unet_inputs: tuple) -> torch.Tensor:
    sample, t, text, time_ids, pooled = unet_inputs
    with torch.no_grad():
        return unet(sample, t, text, time_ids, pooled)


def run_diffusers(unet: torch.nn.Module, unet_inputs: tuple) -> torch.Tensor:
    sample, t, text, time_ids, pooled = unet_inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=text,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


@pytest.fixture(scope="module")
def lora_files(diffsynth_unet: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random rank-4 LoRA as DiffSynth's trainer names it (peft targets), and our two exports of it."""
    _, weights = diffsynth_unet
    gen = torch.Generator().manual_seed(1)
    state = {}
    for module in sorted(module_map()):
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_dim, in_dim = weights[f"{module}.weight"].shape
            state[f"{module}.lora_A.default.weight"] = torch.randn(RANK, in_dim, generator=gen) * 0.2
            state[f"{module}.lora_B.default.weight"] = torch.randn(out_dim, RANK, generator=gen) * 0.2
    folder = tmp_path_factory.mktemp("loras")
    src = save_lora(state, folder / "story_lora.safetensors", META)
    return {"diffsynth": src, "diffusers": export_lora(src, "diffusers", folder / "story_lora.diffusers.safetensors"),
            "kohya": export_lora(src, "kohya", folder / "story_lora.kohya.safetensors")}


@pytest.fixture(scope="module")
def reference(diffsynth_unet: tuple, lora_files: dict, unet_inputs: tuple) -> dict[float, torch.Tensor]:
    """DiffSynth's UNet output with the LoRA merged by kolors_lib.kolors.lora.merge_lora, per strength."""
    from kolors_lib.kolors.lora import load_lora

    unet, weights = diffsynth_unet
    state, meta = load_lora(lora_files["diffsynth"])
    out = {}
    for strength in (0.0, 0.5, 1.0):
        unet.load_state_dict(weights)
        merge_lora(unet, state, strength, meta=meta)
        out[strength] = run_diffsynth(unet, unet_inputs)
    unet.load_state_dict(weights)
    return out


@pytest.fixture
def kolors_model(tiny_unet_root: Path) -> dict:
    """Shaped like ComfyUI-KwaiKolorsWrapper's KOLORSMODEL: {"pipeline": <pipeline with .unet>, "dtype": ...}."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_unet_root / "Kolors/unet", variant="fp16").eval()
    pipeline = KolorsPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                              scheduler=EulerDiscreteScheduler())
    return {"pipeline": pipeline, "dtype": torch.float32}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_node_mapping_agrees_with_diffsynth_converter(node_mod: types.ModuleType) -> None:
    mapping = module_map()
    blocks = {f"blocks.{n}." for n in node_mod.ATTENTION_BLOCKS}
    inside = {k: v for k, v in mapping.items() if any(k.startswith(b) for b in blocks)}
    assert len(inside) > 560
    assert {k: node_mod.diffsynth_to_diffusers(k) for k in inside} == inside
    assert node_mod.diffsynth_to_diffusers("blocks.8.conv1") is None


def test_node_at_strength_1_matches_diffsynth_merge(node_mod, kolors_model: dict, lora_files: dict,
                                                    reference: dict, unet_inputs: tuple) -> None:
    base = run_diffusers(kolors_model["pipeline"].unet, unet_inputs)
    close(base, reference[0.0])  # same tiny model in both implementations
    assert (reference[1.0] - reference[0.0]).abs().max() > 1e-2, "the LoRA changes the output"
    node = node_mod.KolorsStoryLoRA()
    assert node.INPUT_TYPES()["required"]["lora_file"][0] == "STRING"  # no ComfyUI here: a path box
    (out,) = node.load_lora(kolors_model, str(lora_files["diffusers"]), 1.0)
    assert out is not kolors_model and out["dtype"] is torch.float32
    assert out["story_loras"][-1]["naming"] == "diffusers" and out["story_loras"][-1]["modules"] == 560
    close(run_diffusers(out["pipeline"].unet, unet_inputs), reference[1.0])
    # copy-on-write: the input model is untouched, and untouched weights are shared, not copied
    assert torch.equal(run_diffusers(kolors_model["pipeline"].unet, unet_inputs), base)
    old = dict(kolors_model["pipeline"].unet.named_parameters())
    new = dict(out["pipeline"].unet.named_parameters())
    assert new["conv_in.weight"] is old["conv_in.weight"]
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert new[to_q] is not old[to_q] and not torch.equal(new[to_q], old[to_q])


def test_node_strength_half_and_other_namings(node_mod, kolors_model: dict, lora_files: dict,
                                              reference: dict, unet_inputs: tuple) -> None:
    node = node_mod.KolorsStoryLoRA()
    (half,) = node.load_lora(kolors_model, str(lora_files["diffusers"]), 0.5)
    y_half = run_diffusers(half["pipeline"].unet, unet_inputs)
    close(y_half, reference[0.5])
    assert (y_half - reference[1.0]).abs().max() > 1e-3
    for naming in ("kohya", "diffsynth"):
        (out,) = node.load_lora(kolors_model, str(lora_files[naming]), 1.0)
        assert out["story_loras"][-1]["naming"] == naming
        close(run_diffusers(out["pipeline"].unet, unet_inputs), reference[1.0])
    # two nodes in a chain stack: 0.5 (diffusers) then 0.5 (kohya) = 1.0
    (chained,) = node.load_lora(half, str(lora_files["kohya"]), 0.5)
    close(run_diffusers(chained["pipeline"].unet, unet_inputs), reference[1.0])


def _edited(path: Path, dest: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    edit(state)
    save_file(state, str(dest), metadata=meta)
    return dest


def test_a_lora_that_does_not_fit_names_the_key(node_mod, kolors_model: dict, lora_files: dict,
                                                tmp_path: Path) -> None:
    key = "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.lora_B.weight"
    unet = kolors_model["pipeline"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    node = node_mod.KolorsStoryLoRA()
    cases = {
        "shape": (lambda s: s.__setitem__(key, torch.zeros(s[key].shape[0] + 1, RANK)), "wrong shapes"),
        "missing": (lambda s: s.pop(key), "missing keys"),
        "unexpected": (lambda s: s.__setitem__("unet.down_blocks.9.attentions.0.to_z.lora_A.weight",
                                               torch.zeros(RANK, 8)), "unexpected keys"),
    }
    for how, (edit, kind) in cases.items():
        bad = _edited(lora_files["diffusers"], tmp_path / f"{how}.safetensors", edit)
        with pytest.raises(node_mod.StoryLoraError) as err:
            node.load_lora(kolors_model, str(bad), 1.0)
        assert kind in str(err.value)
        expected = "to_z" if how == "unexpected" else key.removesuffix(".lora_B.weight")
        assert expected in str(err.value), str(err.value)
    # the message names the misshapen tensor: the down/A one here, not its up/B partner
    a_key = key.replace(".lora_B.", ".lora_A.")
    bad = _edited(lora_files["diffusers"], tmp_path / "down.safetensors",
                  lambda s: s.__setitem__(a_key, torch.zeros(RANK, s[a_key].shape[1] + 1)))
    with pytest.raises(node_mod.StoryLoraError, match="wrong shapes") as err:
        node.load_lora(kolors_model, str(bad), 1.0)
    assert a_key in str(err.value) and key not in str(err.value), str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items()), "nothing merged on error"
    ckpt = tmp_path / "epoch=0-step=500.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(node_mod.StoryLoraError, match="never unpickles"):
        node.load_lora(kolors_model, str(ckpt), 1.0)
    with pytest.raises(FileNotFoundError):
        node.load_lora(kolors_model, str(tmp_path / "not_there.safetensors"), 1.0)


def test_inside_comfyui_the_file_comes_from_the_loras_folder(lora_files: dict, monkeypatch) -> None:
    folder = lora_files["diffusers"].parent
    fake = types.ModuleType("folder_paths")
    fake.get_filename_list = lambda kind: sorted(p.name for p in folder.iterdir()) if kind == "loras" else []
    fake.get_full_path = lambda kind, name: str(folder / name) if (folder / name).is_file() else None
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    node_cls = load_node_package("kolors_story_lora_in_comfy").NODE_CLASS_MAPPINGS["KolorsStoryLoRA"]
    nodes = sys.modules.pop(node_cls.__module__)
    choices = node_cls.INPUT_TYPES()["required"]["lora_file"][0]
    assert {"story_lora.diffusers.safetensors", "story_lora.kohya.safetensors"} <= set(choices)
    assert nodes.resolve_lora_path("story_lora.diffusers.safetensors") == str(lora_files["diffusers"])


def test_in_place_merge_restores_exactly(node_mod, kolors_model: dict, lora_files: dict) -> None:
    unet = kolors_model["pipeline"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    state, meta = node_mod.read_lora_file(str(lora_files["kohya"]))
    pairs = node_mod.lora_pairs(state, meta, unet)
    originals = node_mod.merge_in_place(unet, pairs, 1.0)
    assert len(originals) == 560 and not all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    node_mod.restore_weights(unet, originals)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
