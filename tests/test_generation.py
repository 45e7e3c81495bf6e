"""Step 04: story validation, the two-phase (offloaded ChatGLM) render == DiffSynth's stock pipeline call,
manifest reproduction, strength sweep, img2img refine and the CLI, on the tiny Kolors (64², 2 steps)."""

from __future__ import annotations

import json
import shutil
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kolors_lib.cli.main import main as cli_main
from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import CONFIG_DIR, load_config
from kolors_lib.core.errors import LoraMismatchError, LoraNotFoundError, StoryError
from kolors_lib.core.files import sha256_file
from kolors_lib.core.images import find_cjk_font
from kolors_lib.kolors.lora import load_lora, merge_lora, save_lora
from kolors_lib.kolors.merger import LoraMerger
from kolors_lib.kolors.models import KolorsPaths, load_model_manager
from kolors_lib.kolors.renderer import KolorsRenderer, read_lora
from kolors_lib.kolors.story import load_story, with_trigger
from kolors_lib.offline_models.tiny import write_tiny_kolors
from kolors_lib.storyboard import storyboard as G

patch_torchvision()

RANK, ALPHA = 4, 4.0
TRIGGER = "kstory"
SIZE, STEPS = 64, 2
TARGETS = ("to_q", "to_k", "to_v", "to_out")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kolors_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_kolors(tmp_path_factory.mktemp("models"), seed=0)["kolors"]


def make_cfg(workdir: Path, kolors_root: Path, **generate):
    overrides = {"models": {"kolors": {"local_dir": str(kolors_root)}}, "filter": {"trigger_word": TRIGGER},
                 "generate": {"steps": STEPS, "width": SIZE, "height": SIZE, **generate}}
    return load_config(profile="tiny", workdir=workdir, overrides=overrides)


def random_lora(kolors_root: Path, seed: int = 1, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A LoRA on to_q/k/v/out of the tiny UNet in DiffSynth (peft) naming, random A and B."""
    unet = load_model_manager([KolorsPaths.from_root(kolors_root).unet]).fetch_model("sdxl_unet")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in unet.state_dict().items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS and weight.ndim == 2:
            state[f"{module}.lora_A.default.weight"] = torch.randn(RANK, weight.shape[1], generator=gen) * std
            state[f"{module}.lora_B.default.weight"] = torch.randn(weight.shape[0], RANK, generator=gen) * std
    return state


@pytest.fixture(scope="module")
def lora_file(kolors_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "kolors_lora.safetensors"
    return save_lora(random_lora(kolors_root), path, {"rank": RANK, "alpha": ALPHA, "trigger_word": TRIGGER})


def write_story(path: Path, change=None) -> Path:
    """The course story with finished prompts (scene, prompt, seed), changed by `change`, written to `path`."""
    data = yaml.safe_load((CONFIG_DIR / "story.yaml").read_text(encoding="utf-8"))
    data = {k: v for k, v in data.items() if k not in ("style", "characters")}
    data["scenes"] = [{"scene": s.scene, "prompt": s.prompt, "seed": s.seed}
                      for s in load_story(CONFIG_DIR / "story.yaml").scenes]
    if change:
        change(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def pixels(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB")).copy()
    return np.asarray(image.convert("RGB")).copy()


# ---------------------------------------------------------------- story files


def test_the_course_story_file_is_valid() -> None:
    story = load_story(CONFIG_DIR / "story.yaml")
    assert len(story.scenes) == 8 and [s.seed for s in story.scenes] == list(range(1, 9))
    assert (story.steps, story.width, story.height, story.cfg_scale) == (50, 1024, 1024, 4.0)
    assert story.scenes[0].scene == "女主正在上课" and story.negative.startswith("现代风格")


BAD_STORIES = {
    "no_scenes": (lambda d: d.update(scenes=[]), r"'scenes' is empty: give at least one scene"),
    "empty_prompt": (lambda d: d["scenes"][2].update(prompt="  "), r"scene 3: prompt is empty"),
    "unknown_key": (lambda d: d.update(colour="red"), r"unknown key\(s\) colour"),
    "unknown_scene_key": (lambda d: d["scenes"][4].update(negtive="x"), r"scene 5: unknown key\(s\) negtive"),
    "seed_not_int": (lambda d: d["scenes"][1].update(seed="2"), r"scene 2: seed must be an integer"),
    "size": (lambda d: d.update(width=1000), r"width must be a multiple of 64 from 64 to 2048"),
}


@pytest.mark.parametrize("case", sorted(BAD_STORIES))
def test_bad_stories_fail_before_any_model_loads(case: str, tmp_path: Path, kolors_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    change, message = BAD_STORIES[case]
    story = write_story(tmp_path / "story.yaml", change)
    loads = []
    monkeypatch.setattr(G, "KolorsRenderer", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    monkeypatch.setattr(G, "read_lora", lambda *a, **k: loads.append(a) or pytest.fail("LoRA read"))
    cfg = make_cfg(tmp_path / "w", kolors_root)
    start = time.monotonic()
    with pytest.raises(StoryError, match=message) as err:
        G.render_storyboard(cfg, story)
    assert time.monotonic() - start < 2 and not loads
    assert str(story) in str(err.value)


def test_story_errors_list_every_problem(tmp_path: Path) -> None:
    def change(d: dict) -> None:
        d["scenes"] = d["scenes"][:7]
        d["scenes"][0]["prompt"] = ""
        d["width"] = 1000

    with pytest.raises(StoryError, match=r"width must be.*scene 1: prompt is empty"):
        load_story(write_story(tmp_path / "s.yaml", change))
    (tmp_path / "broken.yaml").write_text("scenes: [a, b\n", encoding="utf-8")
    with pytest.raises(StoryError, match="broken.yaml: not valid YAML"):
        load_story(tmp_path / "broken.yaml")
    with pytest.raises(StoryError, match="not found"):
        load_story(tmp_path / "none.yaml")


def test_trigger_word_is_prepended_once() -> None:
    assert with_trigger("古风，水墨画", "kstory") == "kstory, 古风，水墨画"
    assert with_trigger("kstory, 古风", "kstory") == "kstory, 古风"
    assert with_trigger("古风", "") == "古风"


def test_captions_never_draw_tofu() -> None:
    story = load_story(CONFIG_DIR / "story.yaml")
    font = find_cjk_font("".join(s.scene for s in story.scenes))
    captions = G.panel_captions(story.scenes, font)
    if font is None:  # no CJK font installed: ASCII captions
        assert captions[0] == "01 · seed 1" and all(c.replace("·", "").isascii() for c in captions)
    else:
        from matplotlib import ft2font

        face = ft2font.FT2Font(str(font))
        assert "Last Resort" not in face.family_name and all(face.get_char_index(ord(c)) for c in "女主正在上课")
        assert captions[0] == "01 女主正在上课"
    assert G.panel_captions(story.scenes, Path("any.ttf"))[1] == "02 开始睡着了"


# ---------------------------------------------------------------- LoRA problems, before any denoising


def test_missing_lora_says_to_run_step_03(tmp_path: Path, kolors_root: Path, capsys) -> None:
    cfg = make_cfg(tmp_path / "w", kolors_root)
    with pytest.raises(LoraNotFoundError, match=r"python -m kolors_lib train"):
        G.render_storyboard(cfg)
    code = cli_main(["storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: LoRA file not found") and err.count("\n") == 1


def test_a_lora_that_does_not_fit_fails_before_encoding(tmp_path: Path, kolors_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    state = random_lora(kolors_root)
    bad = "blocks.10.transformer_blocks.0.attn2.to_k.lora_A.default.weight"
    state[bad] = torch.zeros(RANK, state[bad].shape[1] + 3)
    path = save_lora(state, tmp_path / "bad.safetensors", {"rank": RANK, "alpha": ALPHA})
    encoded, loaded = [], []
    monkeypatch.setattr(KolorsRenderer, "encode", lambda *a, **k: encoded.append(a))
    import kolors_lib.kolors.models as models

    real_load = models.load_model_manager
    monkeypatch.setattr(models, "load_model_manager", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    cfg = make_cfg(tmp_path / "w", kolors_root)
    with pytest.raises(LoraMismatchError, match=r"blocks\.10\.transformer_blocks\.0\.attn2\.to_k"):
        G.render_storyboard(cfg, lora_path=path)
    assert not loaded, "the LoRA is checked against a weightless UNet before any model loads"
    assert not encoded and not (cfg.storyboard_dir / "panel_01.png").exists()
    code = cli_main(["storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"), "--lora", str(path)])
    assert code == 2 and capsys.readouterr().err.startswith("error: LoRA does not fit the UNet")


def test_a_story_of_other_than_8_scenes_loads_with_a_notice(tmp_path: Path, capsys) -> None:
    story = load_story(write_story(tmp_path / "three.yaml", lambda d: d.update(scenes=d["scenes"][:3])))
    assert len(story.scenes) == 3
    assert "has 3 scene(s); the challenge's storyboard has 8" in capsys.readouterr().out
    load_story(write_story(tmp_path / "eight.yaml"))
    assert "NOTICE" not in capsys.readouterr().out


# ---------------------------------------------------------------- the LoRA merger


@pytest.mark.parametrize("keep_base", [False, True])
def test_lora_merger_set_again_equals_a_fresh_merge(kolors_root: Path, lora_file: Path, keep_base: bool) -> None:
    def unet():
        return load_model_manager([KolorsPaths.from_root(kolors_root).unet]).fetch_model("sdxl_unet")

    lora = read_lora(lora_file)
    swept = unet()
    base = {k: v.clone() for k, v in swept.state_dict().items()}
    merger = LoraMerger(swept, lora, keep_base=keep_base)
    for strength in (0.5, 1.0, 0.0):
        merger.set(strength)
        fresh = unet()
        LoraMerger(fresh, lora).set(strength)
        for key, weight in fresh.state_dict().items():
            if keep_base:
                assert torch.equal(swept.state_dict()[key], weight), (strength, key)
            else:  # the previous delta subtracted: equal up to float rounding
                torch.testing.assert_close(swept.state_dict()[key], weight, rtol=0, atol=1e-5)
        assert merger.strength == strength
        changed = [k for k, v in swept.state_dict().items() if not torch.allclose(v, base[k], atol=1e-5)]
        assert bool(changed) == (strength != 0), f"strength {strength} changed {len(changed)} weights"


# ---------------------------------------------------------------- the storyboard


@pytest.fixture(scope="module")
def board(kolors_root: Path, lora_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """render_storyboard at strength 1, recording the order of ChatGLM and UNet calls."""
    import diffsynth.pipelines.sdxl_image as sdxl_image
    from diffsynth.models.kolors_text_encoder import ChatGLMModel

    events: list[tuple[str, bool]] = []
    encoders: list[weakref.ref] = []
    forward, dance = ChatGLMModel.forward, sdxl_image.lets_dance_xl

    def te_forward(self, *args, **kwargs):
        encoders.append(weakref.ref(self))
        events.append(("text", True))
        return forward(self, *args, **kwargs)

    def unet_call(*args, **kwargs):
        events.append(("unet", all(ref() is None for ref in encoders)))  # ChatGLM freed by now?
        return dance(*args, **kwargs)

    cfg = make_cfg(tmp_path_factory.mktemp("board"), kolors_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChatGLMModel, "forward", te_forward)
        mp.setattr(sdxl_image, "lets_dance_xl", unet_call)
        result = G.render_storyboard(cfg, lora_path=lora_file, progress=False)
    return cfg, result, events


def test_storyboard_files_and_manifest(board) -> None:
    cfg, result, _ = board
    names = sorted(p.name for p in cfg.storyboard_dir.iterdir())
    assert names == sorted([*(f"panel_{i:02d}.png" for i in range(1, 9)), "manifest.json", "storyboard.png"])
    assert all(Image.open(p).size == (SIZE, SIZE) for p in result.panels)
    assert Image.open(result.grid).size[0] > 4 * SIZE
    assert len(result.figure().axes) == 8 and result.prompts[0].startswith(TRIGGER)
    data = json.loads(result.manifest.read_text(encoding="utf-8"))
    panel = data["panels"][2]
    assert panel["prompt"] == "kstory, " + panel["story_prompt"] and panel["seed"] == 3
    assert (panel["steps"], panel["width"], panel["height"], panel["cfg_scale"]) == (STEPS, SIZE, SIZE, 4.0)
    assert panel["negative"] == data["negative"] != ""
    assert data["scheduler"]["name"] == "EnhancedDDIMScheduler" and data["scheduler"]["num_train_timesteps"] == 1100
    # only values read from the live scheduler: Kolors' beta_end 0.014 shows in its alphas_cumprod
    from diffsynth.schedulers import EnhancedDDIMScheduler

    kolors = EnhancedDDIMScheduler(num_train_timesteps=1100, beta_end=0.014)
    assert data["scheduler"]["alphas_cumprod_last"] == round(kolors.alphas_cumprod[-1], 10)
    assert not {"beta_end", "beta_schedule", "set_by"} & set(data["scheduler"])
    lora = data["lora"]
    assert (lora["strength"], lora["rank"], lora["alpha"], lora["effective_scale"]) == (1.0, RANK, ALPHA, 1.0)
    assert lora["sha256"] == sha256_file(lora["file"])
    assert data["base_model"]["folder"].endswith("Kolors") and data["versions"]["diffsynth"] == "1.1.9"
    assert data["dtype"] == "float32" and data["device"] == "cpu"


def test_all_prompts_are_encoded_before_denoising_and_chatglm_is_freed(board) -> None:
    _, _, events = board
    kinds = [kind for kind, _ in events]
    first_unet = kinds.index("unet")
    assert kinds[:first_unet] == ["text"] * 9, "8 prompts + 1 negative, each once, all first"
    assert "text" not in kinds[first_unet:]
    assert len(kinds) - first_unet == 8 * STEPS * 2  # 8 panels x steps x (cond, uncond)
    assert all(freed for kind, freed in events if kind == "unet"), "ChatGLM still alive while denoising"


def test_phases_never_hold_chatglm_and_the_unet_together(kolors_root: Path) -> None:
    renderer = KolorsRenderer(kolors_root, "cpu", offload_text_encoder=True)
    assert renderer.pipe.text_encoder_kolors is None and renderer.pipe.unet is None  # ChatGLM loads on need
    renderer.encode(["kstory, 山水"], [""])
    assert renderer.encoded == 2
    assert renderer.text_encoder_released and renderer.pipe.text_encoder_kolors is None
    assert renderer.unet is not None and renderer.pipe.vae_decoder is not None  # phase 2 loads now
    resident = KolorsRenderer(kolors_root, "cpu", offload_text_encoder=False)
    assert resident.pipe.text_encoder_kolors is not None and resident.pipe.unet is not None


def test_prompt_cache_answers_a_rerun_without_loading_chatglm(kolors_root: Path, tmp_path: Path) -> None:
    """A re-render (new strength, best-of-N, sweep) reads the prompts' encodings from disk: no ChatGLM load,
    the same tensors bit for bit; another ChatGLM (a changed file) misses the cache."""
    first = KolorsRenderer(kolors_root, "cpu", prompt_cache=tmp_path / "prompts")
    first.encode(["kstory, 山水", "kstory, 雨"], [""])
    assert (first.encoded, first.from_cache) == (3, 0)
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 3
    again = KolorsRenderer(kolors_root, "cpu", prompt_cache=tmp_path / "prompts")
    again.encode(["kstory, 雨", "kstory, 山水"], [""])
    assert (again.encoded, again.from_cache) == (0, 3)
    assert str(kolors_root / "text_encoder") not in again.load_log and again.pipe.text_encoder_kolors is None
    assert str(kolors_root / "text_encoder") in first.load_log  # (the check can see a load)
    for key, tensors in first.cache.items():
        assert all(torch.equal(tensors[k], again.cache[key][k]) for k in tensors)
    one_new = KolorsRenderer(kolors_root, "cpu", prompt_cache=tmp_path / "prompts")
    one_new.encode(["kstory, 山水", "kstory, 雪"], [""])
    assert (one_new.encoded, one_new.from_cache) == (1, 2)
    other = tmp_path / "other-kolors"
    shutil.copytree(kolors_root, other)
    config = other / "text_encoder" / "config.json"
    config.write_text(config.read_text(encoding="utf-8") + " ", encoding="utf-8")
    changed = KolorsRenderer(other, "cpu", prompt_cache=tmp_path / "prompts")
    changed.encode(["kstory, 山水"], [""])
    assert (changed.encoded, changed.from_cache) == (2, 0)


@pytest.fixture(scope="module")
def stock(kolors_root: Path, lora_file: Path, board):
    """DiffSynth's stock pipeline call (ChatGLM inside), base model then the same LoRA merged at 1.0."""
    from diffsynth import SDXLImagePipeline

    _, result, _ = board
    data = json.loads(result.manifest.read_text(encoding="utf-8"))
    pipe = SDXLImagePipeline.from_model_manager(load_model_manager(KolorsPaths.from_root(kolors_root).files()))

    def call(i: int) -> np.ndarray:
        p = data["panels"][i]
        return pixels(pipe(p["prompt"], negative_prompt=p["negative"], cfg_scale=p["cfg_scale"], height=p["height"],
                           width=p["width"], num_inference_steps=p["steps"], seed=p["seed"]))

    base = {i: call(i) for i in (0, 5)}
    state, meta = load_lora(lora_file)
    merge_lora(pipe.unet, state, 1.0, meta=meta)
    return base, {i: call(i) for i in (0, 5)}


def test_offloaded_render_equals_the_stock_pipeline_call(board, stock) -> None:
    _, result, _ = board
    base, with_lora = stock
    for i in (0, 5):
        assert np.array_equal(pixels(result.panels[i]), with_lora[i]), f"panel {i + 1} differs from stock"
        assert not np.array_equal(with_lora[i], base[i]), "the LoRA changed nothing"


def test_manifest_reproduces_a_panel(board, tmp_path: Path) -> None:
    _, result, _ = board
    image = G.reproduce(result.manifest, 4, out_path=tmp_path / "again.png")
    assert np.array_equal(pixels(image), pixels(result.panels[4]))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(result.panels[4]))
    with pytest.raises(StoryError):
        G.reproduce(result.manifest, 8)


def test_strength_sweep_base_and_lora(board, stock, lora_file: Path) -> None:
    cfg, result, _ = board
    path = G.strength_sweep(cfg, 0, [0.0, 0.5, 1.0], lora_path=lora_file, progress=False)
    assert path == cfg.storyboard_dir / "sweep.png" and Image.open(path).size[0] > 3 * SIZE
    folder = cfg.storyboard_dir / "sweep"
    s0, s05, s1 = (pixels(folder / f"scene01_s{s:.2f}.png") for s in (0.0, 0.5, 1.0))
    assert np.array_equal(s0, stock[0][0]), "strength 0 must be the base model"
    assert np.array_equal(s1, pixels(result.panels[0])), "strength 1 must be the storyboard's panel"
    assert not np.array_equal(s05, s0) and not np.array_equal(s05, s1)


def test_render_one_prompt_at_strengths_and_seeds(board, stock, lora_file: Path) -> None:
    cfg, result, _ = board
    story_prompt = json.loads(result.manifest.read_text(encoding="utf-8"))["panels"][0]["story_prompt"]
    out = G.render(cfg, story_prompt, [0.0, 1.0], [1, 2], lora_path=lora_file, name="mine", progress=False)
    assert out.folder == cfg.renders_dir / "mine" and out.prompt == result.prompts[0]
    assert [f.name for f in out.files] == ["s0.00_seed1.png", "s0.00_seed2.png", "s1.00_seed1.png", "s1.00_seed2.png"]
    assert all(np.array_equal(pixels(i), pixels(f)) for i, f in zip(out.images, out.files, strict=True))
    assert np.array_equal(pixels(out.files[0]), stock[0][0]), "strength 0 must be the base model"
    assert np.array_equal(pixels(out.files[2]), pixels(result.panels[0])), "strength 1, seed 1 = panel 1"
    assert not np.array_equal(pixels(out.files[2]), pixels(out.files[3])), "seeds must differ"
    assert Image.open(out.grid).size[0] > 2 * SIZE
    data = json.loads((out.folder / "render.json").read_text(encoding="utf-8"))
    assert data["strengths"] == [0.0, 1.0] and data["seeds"] == [1, 2] and data["files"] == [f.name for f in out.files]
    with pytest.raises(StoryError, match="non-empty prompt"):
        G.render(cfg, "  ", lora_path=lora_file)


def test_sampler_steps_see_every_step_and_change_nothing(board, lora_file: Path, tmp_path: Path) -> None:
    from kolors_lib.kolors.architecture import NUM_TRAIN_TIMESTEPS
    from kolors_lib.kolors.renderer import SamplerSteps

    cfg, result, _ = board
    story_prompt = json.loads(result.manifest.read_text(encoding="utf-8"))["panels"][0]["story_prompt"]
    seen = SamplerSteps()
    with pytest.raises(RuntimeError, match="no render"):
        seen.decode(torch.zeros(1, 4, 8, 8))
    out = G.render(cfg, story_prompt, seeds=[1], lora_path=lora_file, name="watched", progress=False, on_step=seen)
    assert np.array_equal(pixels(out.files[0]), pixels(result.panels[0])), "watching must not change the picture"
    assert [s.index for s in seen.steps] == list(range(STEPS)) and seen.steps[-1].timestep == 0
    assert seen.steps[0].timestep == NUM_TRAIN_TIMESTEPS - 1
    # the last step goes to t = 0: the clean latents its noise guess implies are the finished picture
    last = seen.steps[-1]
    x0 = (last.latents - (1 - last.alpha_cumprod) ** 0.5 * last.noise_pred) / last.alpha_cumprod ** 0.5
    assert np.abs(pixels(seen.decode(x0)).astype(int) - pixels(out.images[0])).max() <= 2
    # img2img starts at the timestep its denoise names and runs only the steps below it
    start = SamplerSteps()
    G.refine(cfg, result.panels[0], "水墨画", denoise=0.5, lora_path=lora_file, seed=3, on_step=start,
             out_path=tmp_path / "r.png")
    assert start.steps[0].timestep == round(NUM_TRAIN_TIMESTEPS * 0.5) - 1 and len(start.steps) == STEPS


def test_a_three_scene_story_renders_three_panels(tmp_path: Path, kolors_root: Path, lora_file: Path,
                                                   capsys) -> None:
    cfg = make_cfg(tmp_path / "w", kolors_root)
    cfg.storyboard_dir.mkdir(parents=True)
    for i in range(1, 9):  # a previous 8-scene render
        Image.new("RGB", (SIZE, SIZE)).save(cfg.storyboard_dir / f"panel_{i:02d}.png")
    story = write_story(tmp_path / "three.yaml", lambda d: d.update(scenes=d["scenes"][:3]))
    result = G.render_storyboard(cfg, story, lora_path=lora_file, progress=False)
    assert "has 3 scene(s)" in capsys.readouterr().out
    assert [p.name for p in result.panels] == ["panel_01.png", "panel_02.png", "panel_03.png"]
    assert sorted(p.name for p in cfg.storyboard_dir.glob("panel_*.png")) == [p.name for p in result.panels]
    assert len(json.loads(result.manifest.read_text(encoding="utf-8"))["panels"]) == 3
    assert len(result.figure().axes) == 3
    sweep = G.strength_sweep(cfg, 2, [0.0, 1.0], story_path=story, lora_path=lora_file, progress=False)
    assert np.array_equal(pixels(cfg.storyboard_dir / "sweep" / "scene03_s1.00.png"), pixels(result.panels[2]))
    assert sweep.is_file()


# ---------------------------------------------------------------- img2img


def _picture(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 8 + yy // 8) % 2) * 255], -1)
    return Image.fromarray(img.astype("uint8"))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def test_refine_keeps_the_picture_at_denoise_0_and_sizes_right(tmp_path: Path, kolors_root: Path, lora_file: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With a random VAE, pixels say nothing about structure: compare the latents the VAE sees instead."""
    from diffsynth import SDXLImagePipeline as Pipe

    encoded, decoded = [], []
    enc, dec = Pipe.encode_image, Pipe.decode_image
    monkeypatch.setattr(Pipe, "encode_image", lambda s, x, **k: encoded.append(enc(s, x, **k)) or encoded[-1])
    monkeypatch.setattr(Pipe, "decode_image", lambda s, z, **k: decoded.append(z.clone()) or dec(s, z, **k))
    cfg = make_cfg(tmp_path / "w", kolors_root)
    src = tmp_path / "draft.png"
    _picture(SIZE, SIZE).save(src)
    for denoise in (0.0, 1.0):
        out = G.refine(cfg, src, "水墨画", denoise=denoise, lora_path=lora_file, seed=3, out_path=tmp_path / "r.png")
        assert out == tmp_path / "r.png" and Image.open(out).size == (SIZE, SIZE)
    # denoise 0: the final latent is the picture's own latent (plus t=0 noise); denoise 1: unrelated
    assert torch.equal(encoded[0], encoded[1])
    assert _corr(decoded[0], encoded[0]) > 0.5 > abs(_corr(decoded[1], encoded[0]))
    assert (decoded[0] - encoded[0]).abs().mean() < 0.1 * (decoded[1] - encoded[0]).abs().mean()
    # draft small, refine large: a 40x48 draft becomes a 128x64 image
    small = tmp_path / "small.png"
    _picture(40, 48).save(small)
    out = G.refine(cfg, small, "水墨画", denoise=0.6, width=128, height=64, lora_path=lora_file)
    assert out == cfg.storyboard_dir / "refined" / "small_refined.png" and Image.open(out).size == (128, 64)
    with pytest.raises(ValueError, match="denoise"):
        G.refine(cfg, small, "x", denoise=1.5, lora_path=lora_file)


# ---------------------------------------------------------------- command line


def test_cli_renders_a_storyboard(tmp_path: Path, kolors_root: Path, lora_file: Path, capsys) -> None:
    config = tmp_path / "course.yaml"
    config.write_text(yaml.safe_dump({"profiles": {"tiny": {
        "models": {"kolors": {"local_dir": str(kolors_root)}},
        "generate": {"steps": 1, "width": SIZE, "height": SIZE}}}}), encoding="utf-8")
    work = tmp_path / "w"
    code = cli_main(["storyboard", "--config", str(config), "--profile", "tiny", "--workdir", str(work),
                              "--lora", str(lora_file), "--strength", "0.5"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((work / "storyboard" / "manifest.json").read_text(encoding="utf-8"))
    assert data["lora"]["strength"] == 0.5 and data["steps"] == 1
    assert "storyboard.png" in capsys.readouterr().out
    bad = write_story(tmp_path / "bad.yaml", lambda d: d["scenes"][1].update(seed="2"))
    assert cli_main(["storyboard", "--config", str(config), "--profile", "tiny", "--workdir", str(work),
                              "--story", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: scene 2: seed must be an integer")
    code = cli_main(["render", "山水", "--strength", "0", "1", "--seed", "1", "2", "--config", str(config),
                     "--profile", "tiny", "--workdir", str(work), "--lora", str(lora_file), "--name", "cli"])
    assert code == 0, capsys.readouterr().err
    assert "rendered 4 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "renders" / "cli").glob("*.png")) == [
        "grid.png", "s0.00_seed1.png", "s0.00_seed2.png", "s1.00_seed1.png", "s1.00_seed2.png"]
