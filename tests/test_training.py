"""Step 03: cached encodings, stock-equivalent loss, Lightning training, checkpoints and resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from kolors_lib.cli.main import main as cli_main
from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import NonFiniteLossError
from kolors_lib.train.cache import build_cache, load_image_tensor
from kolors_lib.train.lora_module import KolorsLoraModule, inject_lora
from kolors_lib.train.report import TrainResult
from kolors_lib.train.training import FINAL_NAME, L, train_lora
from tests.train_sets import random_pictures, write_train_dir

RES = 64  # small on purpose: 8x8 latents keep every step in milliseconds
CAPTIONS = ["kstory, a red cat", "kstory, a blue house", "kstory, a red cat"]  # one caption repeats
FAST = {"resolution": RES, "save_every": 2, "gradient_checkpointing": False}


def _write_train_dir(train_dir: Path) -> None:
    """Three small images of different shapes and DiffSynth's metadata.csv."""
    write_train_dir(train_dir, random_pictures([(80, 64), (64, 96), (72, 72)]), CAPTIONS)


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Tiny models written once per module (the per-test configs point at them)."""
    from kolors_lib.kolors.models import kolors_paths

    cfg = load_config(profile="tiny", workdir=tmp_path_factory.mktemp("base") / "workdir")
    kolors_paths(cfg)
    return cfg


@pytest.fixture
def cfg(base_cfg: Config, tmp_path: Path) -> Config:
    """A fresh work dir with training data, sharing the module's tiny models."""
    return _cfg_in(base_cfg, tmp_path / "wd")


def _cfg_in(base: Config, workdir: Path) -> Config:
    cfg = load_config(profile="tiny", workdir=workdir)
    cfg = dataclasses.replace(cfg, models=base.models, resolution=RES)
    _write_train_dir(cfg.train_dir)
    return cfg


def _count_chatglm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ChatGLM forwards (class-level, so it sees every instance)."""
    from diffsynth.models.kolors_text_encoder import ChatGLMModel

    calls = [0]
    original = ChatGLMModel.forward

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatGLMModel, "forward", counted)
    return calls


# --------------------------------------------------------------------------- caching


def test_cache_encodes_each_item_once_keyed_by_content(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_chatglm(monkeypatch)
    first = build_cache(cfg)
    # two distinct captions + the empty prompt (negative prompt for validation grids)
    assert (first.encoded_texts, first.encoded_images, calls[0]) == (3, 3, 3)
    root = cfg.lora_dir / "cache"
    assert len(list((root / "text").glob("*.safetensors"))) == 3
    assert len(list((root / "latents").glob("*.safetensors"))) == 3
    lat = load_file(str(root / "latents" / f"{first.samples[0].image_key}.safetensors"))["latents"]
    assert lat.shape == (4, RES // 8, RES // 8)
    text = load_file(str(root / "text" / f"{first.samples[0].text_key}.safetensors"))
    assert text["encoder_hidden_states"].shape[0] == 256 and text["add_text_embeds"].ndim == 1

    again = build_cache(cfg)
    assert (again.encoded_texts, again.encoded_images, calls[0]) == (0, 0, 3)  # nothing re-encoded

    # a changed caption, a changed image and a new resolution each invalidate only what they touch
    meta = cfg.train_dir / "metadata.csv"
    meta.write_text(meta.read_text().replace("a blue house", "a green house"))
    Image.new("RGB", (70, 70), "white").save(cfg.train_dir / "img_2.png")
    changed = build_cache(cfg)
    assert (changed.encoded_texts, changed.encoded_images) == (1, 1)
    bigger = build_cache(dataclasses.replace(cfg, resolution=2 * RES))
    assert (bigger.encoded_texts, bigger.encoded_images) == (0, 3)


def test_cached_batch_is_what_the_training_dataset_serves(cfg: Config) -> None:
    from kolors_lib.core.errors import MissingInputError
    from kolors_lib.train.cache import CachedDataset, cached_batch

    with pytest.raises(MissingInputError, match="train a LoRA first"):
        cached_batch(cfg.lora_dir / "cache")
    report = build_cache(cfg)
    name, batch = cached_batch(report.root, 1)
    assert name == report.samples[1].file_name
    served = next(item for i in range(3) if torch.equal((item := CachedDataset(report, i, 1, 0, False)[0])["latents"],
                                                        batch["latents"][0]))
    assert set(batch) == set(served) and all(torch.equal(batch[k][0], served[k]) for k in served)


def test_random_flip_caches_both_orientations(cfg: Config) -> None:
    cfg.train.random_flip = True
    report = build_cache(cfg)
    cached = load_file(str(report.root / "latents" / f"{report.samples[0].image_key}.safetensors"))
    assert set(cached) == {"latents", "latents_flipped"}
    assert not torch.equal(cached["latents"], cached["latents_flipped"])


def test_image_preprocessing_matches_diffsynth_dataset(cfg: Config) -> None:
    from diffsynth.data.simple_text_image import TextImageDataset

    stock = TextImageDataset(str(cfg.clean_dir), steps_per_epoch=1, height=RES, width=RES, center_crop=True)
    for i, path in enumerate(stock.path):
        stock.path = [path]  # one image: the stock dataset's random pick becomes deterministic
        ours = load_image_tensor(cfg.train_dir / f"img_{i}.png", RES, center_crop=True, seed=0)
        assert torch.equal(stock[0]["image"], ours)


# --------------------------------------------------------------------------- equivalence with stock


def _stock_module(cfg: Config) -> L.LightningModule:
    """DiffSynth's LightningModelForT2ILoRA set up as examples/train/kolors/train_kolors_lora.py does."""
    from diffsynth import SDXLImagePipeline
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    from kolors_lib.kolors.models import kolors_paths, load_model_manager, resolve_model

    module = LightningModelForT2ILoRA(learning_rate=cfg.train.learning_rate, use_gradient_checkpointing=False)
    vae = resolve_model(cfg, "vae_fp16_fix") / "diffusion_pytorch_model.safetensors"
    module.pipe = SDXLImagePipeline.from_model_manager(load_model_manager([*kolors_paths(cfg).files()[:2], vae]))
    module.pipe.scheduler.set_timesteps(1100)
    module.freeze_parameters()
    module.add_lora_to_model(module.pipe.denoising_model(), lora_rank=cfg.lora.rank,
                             lora_alpha=cfg.lora.alpha, lora_target_modules=",".join(cfg.lora.target_modules),
                             init_lora_weights="gaussian")
    return module


def test_step_loss_and_grads_equal_stock_trainer(cfg: Config) -> None:
    from diffsynth.data.simple_text_image import TextImageDataset

    report = build_cache(cfg)
    ours = KolorsLoraModule.from_config(cfg)
    ours.train()
    stock = _stock_module(cfg)
    stock_unet = stock.pipe.denoising_model()
    # same LoRA weights in both (B is zero at init: perturb it so the LoRA path matters)
    with torch.no_grad():
        for p in ours.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    stock_params = dict(stock_unet.named_parameters())
    lora = ours.lora_state_dict()
    assert set(lora) == {n for n, p in stock_params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in lora.items():
            stock_params[name].copy_(value)

    sample = report.samples[0]
    stock_ds = TextImageDataset(str(cfg.clean_dir), steps_per_epoch=1, height=RES, width=RES,
                                center_crop=True)
    stock_ds.path, stock_ds.text = [str(cfg.train_dir / sample.file_name)], [sample.text]
    # the stock step gets the raw caption and image and encodes both itself
    stock_batch = {"text": [sample.text], "image": stock_ds[0]["image"][None]}
    from kolors_lib.train.cache import CachedDataset

    item = CachedDataset(report, 0, 1, cfg.seed, False)
    our_batch = {k: v[None] for k, v in {"latents": item.latents[0]["latents"], **item.texts[0]}.items()}

    for seed in (0, 1, 2):
        # Both steps draw torch.randn_like(latents) then torch.randint(0, 1100, (1,)) from the global
        # generator and nothing else does (no dropout in eval ChatGLM, the VAE takes the mean), so
        # reseeding before each step gives both the same noise and timestep.
        torch.manual_seed(seed)
        loss_ours = ours.training_step(our_batch, 0)
        torch.manual_seed(seed)
        loss_stock = stock.training_step(stock_batch, 0)
        torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-5, atol=1e-7)
        ours.zero_grad()
        stock_unet.zero_grad()
        loss_ours.backward()
        loss_stock.backward()
        for name, p in ours.unet.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, stock_params[name].grad, rtol=1e-4, atol=1e-8)


def test_lora_injection_matches_stock_settings(base_cfg: Config) -> None:
    from kolors_lib.train.lora_module import load_unet

    unet = inject_lora(load_unet(base_cfg), base_cfg.lora)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert "blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in names
    assert {n.split(".")[-4] for n in names} == set(base_cfg.lora.target_modules)
    layer = unet.blocks[7].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default"] == pytest.approx(base_cfg.lora.scale)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # gaussian init: B = 0
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- train_lora


class _Interrupt(RuntimeError):
    """Simulated crash."""


class _StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            raise _Interrupt(f"stop at {self.step}")


class _Spy(L.Callback):
    """Records ChatGLM calls when the training loop starts and ends."""

    def __init__(self, calls: list[int]):
        self.calls, self.seen = calls, []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.seen.append(self.calls[0])

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.seen.append(self.calls[0])


def test_train_lora_outputs_and_no_text_encoder_during_steps(cfg: Config,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_chatglm(monkeypatch)
    spy = _Spy(calls)
    cfg.train.validation_prompts = ["kstory, a dog"]
    settings = {**FAST, "gradient_checkpointing": True}
    result = train_lora(cfg, steps=4, validate_every=4, callbacks=[spy], **settings)
    assert isinstance(result, TrainResult)
    assert calls[0] == 4  # 2 captions + validation prompt + empty negative, each encoded once
    assert spy.seen == [4, 4]  # ...and not one ChatGLM forward while training
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in result.losses)
    assert result.lora_path == cfg.lora_dir / FINAL_NAME
    tensors = load_file(str(result.lora_path))
    assert "blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in tensors
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if "lora_B" in k)  # it trained
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == str(cfg.lora.rank) and meta["alpha"] == str(cfg.lora.alpha)
    assert meta["trigger_word"] == cfg.filter.trigger_word and meta["steps"] == "4"
    assert [p.name for p in result.checkpoints] == ["step-0000002.pt", "step-0000004.pt"]
    assert [p.name for p in result.validation_images] == ["step-0000004.png"]
    assert Image.open(result.validation_images[0]).size == (cfg.generate.width, cfg.generate.height)
    fig = result.loss_plot()
    assert fig.axes and fig.axes[0].get_xlabel() == "step"
    assert result.steps_per_second > 0


# every issue-12 option on at once (patience high enough not to stop a 4-step run)
ALL_OPTIONS = {"val_files": ["img_2.png"], "val_every": 1, "early_stop_patience": 10, "optimizer": "lion",
               "lr_scheduler": "cosine", "lr_warmup_steps": 1, "min_snr_gamma": 5.0, "noise_offset": 0.05,
               "target_modules": "attn_ff", "buckets": True, "augment_variants": 2, "ema_decay": 0.9}


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["stock", "all-options"])
def test_resume_after_interrupt_equals_uninterrupted_run(base_cfg: Config, tmp_path: Path, options: dict) -> None:
    settings = {"steps": 4, "grad_accum": 2, "random_flip": True, **FAST, **options}
    whole = train_lora(_cfg_in(base_cfg, tmp_path / "a"), **settings)

    cfg = _cfg_in(base_cfg, tmp_path / "b")
    with pytest.raises(_Interrupt):
        train_lora(cfg, callbacks=[_StopAt(2)], **settings)
    assert not (cfg.lora_dir / FINAL_NAME).exists()
    assert [s for s, _ in TrainResult(cfg.lora_dir / FINAL_NAME, cfg.lora_dir / "loss.csv", [], 0, 0, 0.0,
                                      cfg.lora_dir).losses] == [1, 2]
    resumed = train_lora(cfg, **settings)
    assert resumed.resumed_from == 2
    assert resumed.losses == whole.losses  # steps 1-2 kept, 3-4 as in the uninterrupted run
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_losses == whole.val_losses and resumed.best_step == whole.best_step
    for extra in ("ema", "last"):  # written only with those options
        name = f"kolors_lora.{extra}.safetensors"
        assert (whole.lora_path.parent / name).is_file() == bool(options)
        if options:
            a, b = load_file(str(whole.lora_path.parent / name)), load_file(str(resumed.lora_path.parent / name))
            assert all(torch.equal(a[k], b[k]) for k in a)

    before = sorted(p.name for p in resumed.checkpoints)
    with pytest.warns(UserWarning, match="moved aside|kept in"):
        fresh = train_lora(cfg, resume=False, **settings)  # starting afresh gives the same again
    assert fresh.resumed_from == 0 and fresh.losses == whole.losses
    # the run that was not resumed is set aside, never deleted
    aside = cfg.lora_dir / "checkpoints.set-aside-1"
    assert sorted(p.name for p in aside.glob("step-*.pt")) == before


def test_nan_loss_stops_with_clear_error_keeping_last_checkpoint(cfg: Config,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = KolorsLoraModule.compute_loss
    count = [0]

    def poisoned(self: KolorsLoraModule, batch: dict) -> torch.Tensor:
        count[0] += 1
        loss = original(self, batch)
        return loss * float("nan") if count[0] == 3 else loss

    monkeypatch.setattr(KolorsLoraModule, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        train_lora(cfg, steps=6, **{**FAST, "save_every": 1})
    ckpts = sorted(p.name for p in (cfg.lora_dir / "checkpoints").glob("*.pt"))
    assert ckpts == ["step-0000001.pt", "step-0000002.pt"]  # the last two good ones are kept
    assert not (cfg.lora_dir / FINAL_NAME).exists()
    state = torch.load(cfg.lora_dir / "checkpoints" / "step-0000002.pt", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"]
    assert all(torch.isfinite(v).all() for v in state["lora"].values())
    assert not list((cfg.lora_dir / "checkpoints").glob("*.tmp"))


def test_main_train_cli(cfg: Config, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    models = cfg.models.kolors.local_dir.parent
    config.write_text(f"models:\n  kolors: {{local_dir: {models / 'Kolors'}}}\n"
                      f"  vae_fp16_fix: {{local_dir: {models / 'sdxl-vae-fp16-fix'}}}\n")
    argv = ["--workdir", str(cfg.workdir), "--config", str(config), "--profile", "tiny", "--steps", "1",
            "--rank", "4", "--alpha", "2", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "1",
            "--precision", "32", "--resolution", str(RES), "--seed", "1", "--save-every", "1"]
    assert cli_main(["train", *argv]) == 0
    out = capsys.readouterr().out
    # (the progress bar shares stdout once ipykernel is imported: look for the summary line, not the start)
    assert "LoRA:" in out and "\ntrained 1 steps" in "\n" + out.replace("\r", "\n") and "resumed" not in out
    assert cli_main(["train", *argv]) == 0
    assert "all 1 steps were done before (nothing to train)" in capsys.readouterr().out
    with safe_open(str(cfg.lora_dir / FINAL_NAME), "pt") as f:
        meta = f.metadata()
    assert (meta["rank"], meta["alpha"], meta["batch_size"], meta["seed"]) == ("4", "2.0", "2", "1")
    assert cli_main(["train", "--workdir", str(tmp_path / "empty"), "--profile", "tiny"]) == 2  # no data yet


@pytest.mark.slow
def test_ddp_two_cpu_processes(cfg: Config) -> None:
    # ddp_notebook forks (plain "ddp" would re-run pytest's command line in each rank)
    result = train_lora(cfg, steps=2, strategy="ddp_notebook", devices=2, accelerator="cpu", **FAST)
    assert [s for s, _ in result.losses] == [1, 2]
    final = load_file(str(result.lora_path))
    last = torch.load(result.checkpoints[-1], weights_only=False)["lora"]
    assert all(torch.equal(final[k], last[k]) for k in final)  # the trained weights came back from the ranks
    assert any(torch.count_nonzero(v) for k, v in final.items() if "lora_B" in k)


def test_result_says_what_this_run_did(tmp_path: Path) -> None:
    from kolors_lib.train.report import TrainResult

    def result(steps: int, resumed: int) -> str:
        return str(TrainResult(tmp_path / "l.safetensors", tmp_path / "loss.csv", [], steps, resumed, 2.0,
                               tmp_path / "cache"))

    assert result(30, 30).startswith("all 30 steps were done before")
    assert result(30, 10).startswith("resumed at step 10, trained 20 more (10.00 steps/s)")
    assert result(30, 0).startswith("trained 30 steps (15.00 steps/s)")
    assert str(tmp_path / "l.safetensors") in result(30, 0)


def test_validation_images_use_the_storyboard_renderer_and_settings(cfg: Config,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation goes through DiffSynth's pipeline call with step 04's settings, not a second sampling loop."""
    from diffsynth import SDXLImagePipeline

    from kolors_lib.kolors.story import load_story, render_settings

    calls = []
    real_call = SDXLImagePipeline.__call__

    def recording(self, prompt, **kwargs):  # noqa: ANN001, ANN202 - records, then runs the real call
        calls.append({"prompt": prompt, **kwargs})
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(SDXLImagePipeline, "__call__", recording)
    cfg.train.validation_prompts = ["a dog"]
    train_lora(cfg, steps=2, validate_every=2, **FAST)
    settings = render_settings(cfg, load_story(cfg.generate.story))
    assert len(calls) == 1
    call = calls[0]
    assert call["prompt"] == f"{cfg.filter.trigger_word}, a dog"  # trigger word first, as in step 04
    assert (call["negative_prompt"], call["num_inference_steps"], call["cfg_scale"], call["width"],
            call["height"]) == (settings.negative, settings.steps, settings.cfg_scale, settings.width,
                                settings.height)
