"""Best-of-N panels on the tiny Kolors (N=3, 64², 2 final steps, 1 draft step): the manifest, the objective
recomputed independently from the drafts, reproduction of the finals, a re-run, the cost line, the grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kolors_lib.cli.main import main as cli
from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import load_config
from kolors_lib.core.errors import ConfigError, StoryError
from kolors_lib.kolors.lora import save_lora
from kolors_lib.kolors.models import KolorsPaths, load_model_manager
from kolors_lib.kolors.story import RenderSettings
from kolors_lib.offline_models.tiny import write_tiny_kolors
from kolors_lib.score.scoring import score_folder
from kolors_lib.storyboard import storyboard as G
from kolors_lib.storyboard.selection import candidate_grid, candidate_seeds, draft_budget

patch_torchvision()
N, SIZE, STEPS = 3, 64, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Kolors, a random LoRA on it, and a course config pointing at them."""
    root = tmp_path_factory.mktemp("best")
    kolors = write_tiny_kolors(root / "models", seed=0)["kolors"]
    unet = load_model_manager([KolorsPaths.from_root(kolors).unet]).fetch_model("sdxl_unet")
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, weight in unet.state_dict().items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_out") and weight.ndim == 2:
            state[f"{module}.lora_A.default.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.3
            state[f"{module}.lora_B.default.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.3
    lora = save_lora(state, root / "lora.safetensors", {"rank": 4, "alpha": 4.0, "trigger_word": "kstory"})
    config = root / "course.yaml"
    config.write_text(yaml.safe_dump({"profiles": {"tiny": {
        "models": {"kolors": {"local_dir": str(kolors)}},
        "generate": {"steps": STEPS, "width": SIZE, "height": SIZE}}}}), encoding="utf-8")
    return root, config, lora


@pytest.fixture(scope="module")
def best(setup):
    """render_storyboard with candidates=3; the manifest and panel pixels as they were after the first run."""
    root, config, lora = setup
    cfg = load_config(config, profile="tiny", workdir=root / "w")
    result = G.render_storyboard(cfg, lora_path=lora, candidates=N, progress=False)
    first = json.loads(result.manifest.read_text(encoding="utf-8"))
    return cfg, result, first


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def test_the_manifest_records_every_candidate_and_the_choice(best) -> None:
    cfg, result, data = best
    sel = data["selection"]
    assert sel["candidates"] == N and sel["draft"]["steps"] == STEPS // 2 and sel["consistency_weight"] == 5.0
    assert sel["cost"] == {"drafts": 8 * N, "draft_steps": 8 * N * (STEPS // 2), "final_steps": 8 * STEPS}
    folder = cfg.storyboard_dir / sel["draft"]["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(c["file"] for s in sel["scenes"] for c in s["candidates"])
    for scene, panel in zip(sel["scenes"], data["panels"], strict=True):
        seeds = [c["seed"] for c in scene["candidates"]]
        assert seeds[0] == scene["story_seed"] == panel["story_seed"], "the story's own seed is a candidate"
        assert len(set(seeds)) == N and panel["seed"] == scene["chosen_seed"] == seeds[scene["chosen"]]
        assert all(set(c) == {"seed", "file", "score", "consistency", "value"} for c in scene["candidates"])
    assert any(s["chosen"] != 0 for s in sel["scenes"]), "best-of-3 changed no seed on 8 scenes"
    assert (panel["steps"], panel["width"]) == (STEPS, SIZE), "finals at full settings"


def test_the_choice_is_the_documented_objective_and_never_below_the_story_seeds(best) -> None:
    """Recompute from the draft files with step 05's scorer: value = score + w * mean cosine to other scenes."""
    cfg, _, data = best
    sel = data["selection"]
    scored = score_folder(cfg, cfg.storyboard_dir / sel["draft"]["folder"], write=False)
    files = [[c["file"] for c in s["candidates"]] for s in sel["scenes"]]
    flat = [f for row in files for f in row]
    emb = np.stack([scored.embeddings[f].double().numpy() for f in flat])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    scene_of = np.repeat(np.arange(8), N)
    value = {f: scored.scores[f] + 5.0 * sim[i, scene_of != scene_of[i]].mean() for i, f in enumerate(flat)}
    picks = [int(np.argmax([value[f] for f in row])) for row in files]
    assert picks == [s["chosen"] for s in sel["scenes"]]
    chosen = np.mean([value[row[k]] for row, k in zip(files, picks, strict=True)])
    single = np.mean([value[row[0]] for row in files])  # the single-seed run's drafts: the story's seeds
    assert chosen >= single
    assert sel["chosen_seeds"]["objective"] == pytest.approx(chosen, abs=1e-5)
    assert sel["story_seeds"]["objective"] == pytest.approx(single, abs=1e-5)


def test_reproduce_redraws_a_chosen_final(best, tmp_path: Path) -> None:
    _, result, data = best
    index = next(i for i, s in enumerate(data["selection"]["scenes"]) if s["chosen"] != 0)
    image = G.reproduce(result.manifest, index)
    assert np.array_equal(np.asarray(image.convert("RGB")), pixels(result.panels[index]))


def test_a_rerun_makes_the_same_choices_and_states_its_cost(best, setup, capsys) -> None:
    cfg, result, first = best
    root, config, lora = setup
    code = cli(["storyboard", "--config", str(config), "--profile", "tiny", "--workdir", str(root / "w"),
                              "--lora", str(lora), "--candidates", str(N)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"best of 3: 3 x 8 scenes x 1 draft steps = 24 draft steps ({SIZE}x{SIZE}), then 8 x 2 = 16" in out
    assert "drafts (best of 3)" in out + err  # the progress bar (stdout once ipykernel is imported)
    again = json.loads(result.manifest.read_text(encoding="utf-8"))
    assert again["selection"] == first["selection"]
    assert [p["sha256"] for p in again["panels"]] == [p["sha256"] for p in first["panels"]]


def test_candidate_grid_frames_the_chosen_drafts(best, tmp_path: Path) -> None:
    _, result, data = best
    fig = candidate_grid(result.manifest)
    assert len(fig.axes) == 8 * N
    framed = [i for i, ax in enumerate(fig.axes) if ax.spines["top"].get_visible()]
    assert framed == [row * N + s["chosen"] for row, s in enumerate(data["selection"]["scenes"])]
    assert "(story)" in fig.axes[0].get_title()
    plain = tmp_path / "manifest.json"
    plain.write_text(json.dumps({**data, "selection": None}), encoding="utf-8")
    with pytest.raises(StoryError, match="no best-of-N selection"):
        candidate_grid(plain)


def test_bad_candidate_settings_fail_before_anything_loads(setup, tmp_path: Path) -> None:
    _, config, _ = setup
    missing = tmp_path / "no_lora.safetensors"  # would raise LoraNotFoundError if it were read first
    for overrides, candidates, message in (({}, 0, "candidates must be an integer >= 1"),
                                           ({"draft_scale": 2.0}, 3, r"draft_scale must be in \(0, 1\]"),
                                           ({"consistency_weight": -1}, 3, "consistency_weight must be")):
        cfg = load_config(config, profile="tiny", workdir=tmp_path / "w", overrides={"generate": overrides})
        with pytest.raises(ConfigError, match=message):
            G.render_storyboard(cfg, lora_path=missing, candidates=candidates, progress=False)


def test_candidate_seeds_and_draft_sizes(tmp_path: Path) -> None:
    seeds = [candidate_seeds(s, 4) for s in range(1, 9)]
    assert [row[0] for row in seeds] == list(range(1, 9)) and candidate_seeds(5, 4) == seeds[4]
    assert len({s for row in seeds for s in row}) == 32, "no seed shared between scenes"
    cfg = load_config(profile="tiny", workdir=tmp_path, overrides={"generate": {"draft_scale": 0.3}})
    settings = RenderSettings("", 4.0, 50, 1024, 768)
    plan = draft_budget(cfg, settings, 4)
    assert (plan.steps, plan.width, plan.height, plan.final_steps) == (25, 320, 256, 50)
    assert plan.cost(8) == {"drafts": 32, "draft_steps": 800, "final_steps": 400}


def test_a_single_candidate_is_the_plain_run(best, setup, tmp_path: Path) -> None:
    """candidates=1 draws nothing extra: the panels are the story's seeds, as before."""
    cfg, _, data = best
    _, config, lora = setup
    plain_cfg = load_config(config, profile="tiny", workdir=tmp_path / "w")
    plain = G.render_storyboard(plain_cfg, lora_path=lora, progress=False)
    manifest = json.loads(plain.manifest.read_text(encoding="utf-8"))
    assert manifest["selection"] is None and [p["seed"] for p in manifest["panels"]] == list(range(1, 9))
    assert not (plain_cfg.storyboard_dir / "candidates").exists()
    # where best-of-N kept the story's seed, its final is the single-seed run's panel
    kept = [i for i, s in enumerate(data["selection"]["scenes"]) if s["chosen"] == 0]
    for i in kept:
        assert np.array_equal(pixels(cfg.storyboard_dir / f"panel_{i + 1:02d}.png"), pixels(plain.panels[i]))
    shutil.rmtree(plain_cfg.workdir)
