"""Step 06: assembling the model repo folder and publishing it with the real modelscope client to a loopback hub."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kolors_lib.cli.main import main as cli_main
from kolors_lib.core.config import NAME_HINT, Config
from kolors_lib.core.errors import PublishError
from kolors_lib.core.files import sha256_file
from kolors_lib.kolors.lora import detect_format, load_lora, save_lora
from kolors_lib.publishing.model_card import EXPORTS, LORA_NAME, model_card
from kolors_lib.publishing.publish import TOKEN_ENV, assemble, files_to_upload, publish, validate_repo_id

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

TOKEN = "ms-SECRET-7f3a9c0d4e5b6a7c8d9e0f1a2b3c4d5e"
REPO = "alice/队伍名称-可图Kolors训练-story"
EXPECTED = sorted([LORA_NAME, *EXPORTS.values(), "README.md", "manifest.json", "prompts.txt", "configuration.json",
                   "samples/storyboard.png", *(f"samples/panel_{i:02d}.png" for i in range(1, 9)),
                   "comfyui/kolors_story_workflow.json", "comfyui/kolors_story_lora/__init__.py",
                   "comfyui/kolors_story_lora/nodes.py", "comfyui/kolors_story_lora/README.md"])


def _png(path: Path, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def cfg(tiny_cfg: Config) -> Config:
    """Small fake outputs of steps 03-05 in the tiny config's work dir."""
    cfg = tiny_cfg
    gen = torch.Generator().manual_seed(0)
    module = "blocks.7.transformer_blocks.0.attn1.to_q"
    state = {f"{module}.lora_A.default.weight": torch.randn(4, 32, generator=gen),
             f"{module}.lora_B.default.weight": torch.randn(32, 4, generator=gen)}
    lora = save_lora(state, cfg.lora_dir / LORA_NAME, {
        "rank": "4", "alpha": "2.0", "trigger_word": "xyz_style", "base_model": "Kwai-Kolors/Kolors",
        "profile": "tiny", "steps": "30", "learning_rate": "0.0001", "batch_size": "1", "precision": "16-mixed",
        "resolution": "128", "seed": "42", "target_modules": "to_q,to_k,to_v,to_out"})
    story = cfg.storyboard_dir
    story.mkdir(parents=True)
    for i in range(1, 9):
        _png(story / f"panel_{i:02d}.png", i)
    _png(story / "storyboard.png", 99, size=200)  # > 64 KiB: the client forces it through LFS
    panels = [{"index": i - 1, "file": f"panel_{i:02d}.png", "scene": f"场景{i} [scene {i}]",
               "prompt": f"xyz_style, anime girl, scene {i}, 二次元", "seed": 100 + i} for i in range(1, 9)]
    manifest = {"title": "少女的一天", "negative": "lowres, bad anatomy", "steps": 4, "cfg_scale": 4.0,
                "width": 128, "height": 128, "story_file": str(cfg.workdir / "story.yaml"),
                "base_model": {"model_id": "Kwai-Kolors/Kolors", "folder": str(cfg.workdir / "models"),
                               "profile": "tiny"},
                "lora": {"file": str(lora), "sha256": sha256_file(lora), "strength": 1.0, "rank": 4, "alpha": 2.0},
                "trigger_word": "xyz_style", "panels": panels, "grid": "storyboard.png"}
    (story / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    cfg.scores_dir.mkdir(parents=True)
    scores = {"gate": 6.0, "mean": 6.4321, "passed": True,
              "consistency": {"mean_pairwise_cosine": 0.8771},
              "files": [{"file": p["file"], "score": 6.0 + i / 10, "consistency_to_others": 0.8, "panel": True}
                        for i, p in enumerate(panels)]}
    (cfg.scores_dir / "scores.json").write_text(json.dumps(scores), encoding="utf-8")
    return cfg


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The loopback hub (user alice, member of org `team`), with the client pointed at it and quick retries."""
    import modelscope_hub._upload as upload
    import modelscope_hub.config as hub_config

    with HubServer(users={TOKEN: "alice", "ms-bob-token": "bob"}, orgs={"alice": {"team"}}) as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        monkeypatch.setattr(hub_config, "_default_config", None)
        # the client reads its retry settings from the environment at import time: set the module values
        for name, value in {"UPLOAD_BLOB_MAX_ATTEMPTS": 2, "UPLOAD_BLOB_RETRY_BACKOFF_BASE_SECONDS": 0,
                            "UPLOAD_BLOB_RETRY_MAX_DELAY_SECONDS": 0, "UPLOAD_RECOVERY_ENABLED": False,
                            "UPLOAD_FAILED_FILE_MAX_RETRY_ROUNDS": 1}.items():
            monkeypatch.setattr(upload, name, value)
        yield server
        assert server.unhandled == [], f"the client called endpoints the loopback hub lacks: {server.unhandled}"


# ---------------------------------------------------------------- repo ids


@pytest.mark.parametrize("repo_id", ["alice/kolors-lora", "team_1/队伍名称-可图Kolors训练-xxx", " a/b.v2 "])
def test_valid_repo_ids(repo_id: str) -> None:
    assert validate_repo_id(repo_id) == repo_id.strip()


@pytest.mark.parametrize("repo_id", ["", "noslash", "a/b/c", "a b/c", "a/b c", "/name", "owner/", "a/.hidden"])
def test_invalid_repo_ids_explain_the_naming(repo_id: str) -> None:
    with pytest.raises(PublishError, match="OWNER/NAME") as info:
        validate_repo_id(repo_id)
    assert NAME_HINT in str(info.value)


# ---------------------------------------------------------------- assemble


def test_assemble_builds_the_repo_folder(cfg: Config) -> None:
    sources = {p: sha256_file(p) for d in (cfg.lora_dir, cfg.storyboard_dir, cfg.scores_dir) for p in d.iterdir()}
    folder = assemble(cfg, REPO)
    assert folder == cfg.publish_dir
    assert [p for p, _ in files_to_upload(folder)] == EXPECTED
    assert {p: sha256_file(p) for p in sources} == sources  # sources untouched
    # no temp folder left; logs/ is step 06's log of the libraries it used
    assert sorted(p.name for p in cfg.workdir.iterdir()) == ["logs", "lora", "publish", "scores", "storyboard"]
    for fmt, name in EXPORTS.items():
        state, meta = load_lora(folder / name)
        assert detect_format(state) == fmt and float(meta["alpha"]) == 2.0 and int(meta["rank"]) == 4
    assert (folder / LORA_NAME).read_bytes() == (cfg.lora_dir / LORA_NAME).read_bytes()
    for i in range(1, 9):
        assert (folder / f"samples/panel_{i:02d}.png").read_bytes() == \
            (cfg.storyboard_dir / f"panel_{i:02d}.png").read_bytes()

    card = (folder / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert front["tasks"] == ["text-to-image-synthesis"] and front["base_model"] == ["Kwai-Kolors/Kolors"]
    assert {"lora", "kolors"} <= set(front["tags"]) and front["license"] and front["frameworks"]
    assert "xyz_style" in card and "lora_alpha=0.5" in card  # strength 1.0 = alpha/rank = 2/4
    assert "6.432" in card and "6.0" in card and "PASS" in card and "0.877" in card
    for target in re.findall(r"\]\(([^)]+)\)", card):
        assert target.startswith("http") or (folder / target).is_file(), target
    for i in range(1, 9):
        assert f"scene {i}, 二次元" in card and f"(samples/panel_{i:02d}.png)" in card
    assert str(cfg.workdir) not in card

    prompts = (folder / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in prompts[1:]] == [f"samples/panel_{i:02d}.png" for i in range(1, 9)]
    assert json.loads((folder / "configuration.json").read_text()) == {"framework": "pytorch",
                                                                       "task": "text-to-image-synthesis"}
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["lora"]["file"] == LORA_NAME and manifest["panels"][0]["file"] == "samples/panel_01.png"
    assert str(cfg.workdir) not in (folder / "manifest.json").read_text(encoding="utf-8")


def test_assemble_is_idempotent(cfg: Config) -> None:
    first = _snapshot(assemble(cfg, REPO))
    (cfg.publish_dir / "stray.txt").write_text("left from an earlier run")
    assert _snapshot(assemble(cfg, REPO)) == first


@pytest.mark.parametrize("remove, step", [
    ("lora/kolors_lora.safetensors", "step 03"), ("storyboard/panel_05.png", "step 04"),
    ("storyboard/manifest.json", "step 04"), ("storyboard/storyboard.png", "step 04")])
def test_missing_inputs_name_the_step_and_keep_the_old_folder(cfg: Config, remove: str, step: str) -> None:
    before = _snapshot(assemble(cfg, REPO))
    (cfg.workdir / remove).unlink()
    with pytest.raises(PublishError, match=step):
        assemble(cfg, REPO)
    assert _snapshot(cfg.publish_dir) == before
    assert sorted(p.name for p in cfg.workdir.iterdir()) == ["logs", "lora", "publish", "scores", "storyboard"]


def test_publish_without_step_05_uploads_unscored_with_a_notice(cfg: Config, hub: HubServer,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (cfg.scores_dir / "scores.json").unlink()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    code = cli_main(["publish", "--workdir", str(cfg.workdir), "--profile", "tiny", "--repo-id", REPO])
    out, err = capsys.readouterr()
    assert code == 0, err
    notices = [line for line in out.splitlines() if line.startswith("NOTICE")]
    assert len(notices) == 1 and "publishing unscored" in notices[0] and "step 05" in notices[0]
    card = hub.files(REPO)["README.md"].decode("utf-8")
    assert "Not scored" in card and "PASS" not in card and "FAIL" not in card
    assert hub.files(REPO) == _snapshot(cfg.publish_dir) and sorted(hub.files(REPO)) == EXPECTED


def test_a_story_of_three_panels_publishes_three_samples(cfg: Config) -> None:
    path = cfg.storyboard_dir / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["panels"] = data["panels"][:3]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for i in range(4, 9):
        (cfg.storyboard_dir / f"panel_{i:02d}.png").unlink()
    folder = assemble(cfg, REPO)
    assert sorted(p.name for p in (folder / "samples").iterdir()) == [
        "panel_01.png", "panel_02.png", "panel_03.png", "storyboard.png"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "3-panel story" in card and "the 3 panels" in card and "8" not in card.split("## Files")[0]
    assert len((folder / "prompts.txt").read_text(encoding="utf-8").splitlines()) == 1 + 3
    (cfg.storyboard_dir / "panel_02.png").unlink()
    with pytest.raises(PublishError, match="panel_02.png.*step 04"):
        assemble(cfg, REPO)


def test_storyboard_of_another_lora_is_refused(cfg: Config) -> None:
    path = cfg.storyboard_dir / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["lora"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PublishError, match="another LoRA"):
        assemble(cfg, REPO)


# ---------------------------------------------------------------- publish


def test_dry_run_is_the_default_and_sends_nothing(cfg: Config, hub: HubServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    result = publish(cfg, REPO)
    assert result.dry_run and hub.requests == [] and hub.repos == {}
    assert result.files == files_to_upload(cfg.publish_dir) and [p for p, _ in result.files] == EXPECTED
    text = str(result)
    assert "DRY RUN" in text and REPO in text and all(p in text for p in EXPECTED) and TOKEN not in text


def test_upload_sends_exactly_the_local_bytes(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    result = publish(cfg, REPO, dry_run=False)
    local = _snapshot(cfg.publish_dir)
    assert sorted(local) == EXPECTED  # no .ms_upload_cache or other stray file
    assert hub.files(REPO) == local
    assert result.created and not result.dry_run and result.user == "alice" and result.commit
    assert not hub.repos[REPO].private
    assert {m for m, _ in hub.requests} >= {"POST", "PUT"} and any(p.endswith("/lfs/objects/batch")
                                                                 for _, p in hub.requests)
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, str(result), *(v.decode("utf-8", "replace") for v in local.values())):
        assert TOKEN not in text


def test_reupload_after_a_change_sends_the_change(cfg: Config, hub: HubServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    publish(cfg, REPO, dry_run=False)
    old_card = hub.files(REPO)["README.md"]
    path = cfg.scores_dir / "scores.json"
    path.write_text(path.read_text().replace("6.4321", "7.1234"))
    sent = len(hub.requests)
    result = publish(cfg, REPO, dry_run=False)
    assert not any(m == "PUT" for m, _ in hub.requests[sent:])  # unchanged LoRA blobs are not sent again
    assert not result.created  # already ours: carried on
    new_card = hub.files(REPO)["README.md"]
    assert new_card != old_card and b"7.123" in new_card
    assert hub.files(REPO) == _snapshot(cfg.publish_dir)
    assert len(hub.repos[REPO].commits) == 2


def test_organisation_repo_and_private_flag(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    publish(cfg, "team/kolors-story", dry_run=False, private=True)
    assert hub.repos["team/kolors-story"].private and hub.files("team/kolors-story") == _snapshot(cfg.publish_dir)


def test_missing_token_is_refused_before_any_request(cfg: Config, hub: HubServer) -> None:
    with pytest.raises(PublishError, match=TOKEN_ENV):
        publish(cfg, REPO, dry_run=False)
    assert hub.requests == []


def test_bad_token_gives_a_clear_message(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    bad = "ms-WRONG-0000111122223333"
    monkeypatch.setenv(TOKEN_ENV, bad)
    with pytest.raises(PublishError, match="rejected the token") as info:
        publish(cfg, REPO, dry_run=False)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    out, err = capfd.readouterr()
    assert bad not in str(info.value) + out + err
    assert hub.repos == {} and sorted(_snapshot(cfg.publish_dir)) == EXPECTED


@pytest.mark.parametrize("private", [False, True])
def test_repo_of_someone_else_is_refused(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                         private: bool) -> None:
    hub.add_repo("bob/story", owner_user="bob", private=private, files={"README.md": b"bob's"})
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(PublishError, match="taken by someone else") as info:
        publish(cfg, "bob/story", dry_run=False)
    assert TOKEN not in str(info.value)
    assert hub.files("bob/story") == {"README.md": b"bob's"} and not any(m == "PUT" for m, _ in hub.requests)


def test_namespace_of_someone_else_is_refused(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(PublishError, match="may not create models under 'carol'"):
        publish(cfg, "carol/story", dry_run=False)
    assert hub.repos == {}


def test_one_dropped_connection_is_retried_by_the_client(cfg: Config, hub: HubServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    hub.drop_puts = 1
    publish(cfg, REPO, dry_run=False)
    assert hub.dropped == 1 and hub.files(REPO) == _snapshot(cfg.publish_dir)


def test_network_drop_mid_upload_is_clear_and_a_retry_works(cfg: Config, hub: HubServer,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    before = _snapshot(assemble(cfg, REPO))
    hub.drop_puts = 10_000  # the blob uploads keep failing, past the client's own retries
    with pytest.raises(PublishError, match="failed.*run the same command again") as info:
        publish(cfg, REPO, dry_run=False)
    assert hub.dropped > 0 and info.value.__cause__ is None
    assert _snapshot(cfg.publish_dir) == before  # nothing local lost, no cache file left
    assert hub.files(REPO) != before
    hub.drop_puts = 0
    publish(cfg, REPO, dry_run=False)
    assert hub.files(REPO) == before
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + str(info.value)


# ---------------------------------------------------------------- command line


def test_cli_dry_run_prints_the_plan(cfg: Config, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["publish", "--workdir", str(cfg.workdir), "--profile", "tiny", "--repo-id", REPO, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "DRY RUN" in out and "samples/panel_08.png" in out and hub.requests == []


def test_cli_without_token_or_dry_run_exits_2(cfg: Config, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["publish", "--workdir", str(cfg.workdir), "--profile", "tiny", "--repo-id", REPO])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert TOKEN_ENV in err and "--dry-run" in err and hub.requests == []


def test_cli_bad_repo_id_exits_2(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["publish", "--workdir", str(cfg.workdir), "--profile", "tiny", "--repo-id", "just-a-name",
                     "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and NAME_HINT in err


def test_cli_missing_step_exits_2(tiny_cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["publish", "--workdir", str(tiny_cfg.workdir), "--profile", "tiny", "--repo-id", REPO,
                     "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "step 03" in err and err.count("\n") == 1


def test_cli_upload_with_token_from_the_environment(cfg: Config, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    code = cli_main(["publish", "--workdir", str(cfg.workdir), "--profile", "tiny", "--repo-id", REPO])
    out, err = capfd.readouterr()
    assert code == 0 and "uploaded" in out and TOKEN not in out + err
    assert hub.files(REPO) == _snapshot(cfg.publish_dir)
    digest = hashlib.sha256(hub.files(REPO)[LORA_NAME]).hexdigest()
    assert digest == sha256_file(cfg.lora_dir / LORA_NAME)


def test_card_preview_shows_front_matter_as_yaml_and_embeds_the_images(cfg: Config) -> None:
    import base64
    import io

    from kolors_lib.publishing.preview import card_markdown

    folder = assemble(cfg, REPO)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")  # ModelScope's front matter, which a notebook would render as a list
    text = card_markdown(folder)
    assert "\n---\n" not in text.split("```yaml", 1)[0] and not text.startswith("---")
    front = yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert front == yaml.safe_load(card.split("---\n")[1])
    sources = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(sources) == len(re.findall(r"!\[[^\]]*\]\(samples/", card)) == 9
    for src in sources:  # every picture travels with the notebook: no path left to resolve
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.width <= 640


@pytest.mark.parametrize(("profile", "note"), [("tiny", "`tiny` profile (a random-weight test model)"),
                                               ("toy", "`toy` profile (a small Kolors trained on a toy world"),
                                               ("full", None)])
def test_a_card_from_an_offline_profile_says_it_fits_no_real_kolors(profile: str, note: str | None) -> None:
    manifest = {"title": "红色圆形的一天", "panels": [{"file": "panel_01.png", "scene": "出发", "seed": 1,
                                                 "prompt": "kstory, 古风，水墨画，一个红色的圆形，白色的背景"}]}
    card = model_card(REPO, manifest, None, {"profile": profile, "trigger_word": "kstory"}, rank=4, alpha=4.0)
    notes = [line for line in card.splitlines() if "does not work on the real Kolors" in line]
    if note is None:
        assert notes == [] and "profile" not in card.split("## Files")[0]
    else:
        assert note in card.split("## Files")[0] and len(notes) == 1, card[:800]
