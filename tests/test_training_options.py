"""Issue 12's step-03 options: validation split and early stopping, optimizers and schedules, loss weighting,
buckets, augmentation variants, EMA. Each is checked against its library or its formula, computed here."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kolors_lib.core.config import Config, default_train, load_config
from kolors_lib.core.errors import TrainingError
from kolors_lib.train.buckets import batch_plan, bucket_sizes, nearest_bucket
from kolors_lib.train.cache import Sample, build_cache
from kolors_lib.train.lora_module import KolorsLoraModule
from kolors_lib.train.optim import make_lr_scheduler, make_optimizer
from kolors_lib.train.training import train_lora
from kolors_lib.train.validation import ValidationSet, split_samples
from tests.train_sets import random_pictures, write_train_set

RES = 64
FAST = {"resolution": RES, "save_every": 2, "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    from kolors_lib.kolors.models import kolors_paths

    cfg = load_config(profile="tiny", workdir=tmp_path_factory.mktemp("base") / "workdir")
    kolors_paths(cfg)
    return cfg


def _cfg(base: Config, workdir: Path, shapes: tuple = ((80, 64), (64, 96), (72, 72), (64, 64))) -> Config:
    return write_train_set(base, workdir, random_pictures(shapes), [f"kstory, picture {i}" for i in range(len(shapes))],
                           RES)


# --------------------------------------------------------------------------- validation split


def test_split_is_deterministic_and_checked() -> None:
    samples = [Sample(f"{i}.png", "t") for i in range(10)]
    train, held = split_samples(samples, default_train(val_fraction=0.2), seed=1)
    assert len(held) == 2 and len(train) == 8 and not {s.file_name for s in held} & {s.file_name for s in train}
    again = split_samples(list(reversed(samples)), default_train(val_fraction=0.2), seed=1)[1]
    assert {s.file_name for s in again} == {s.file_name for s in held}  # by name, not by order
    assert [s.file_name for s in split_samples(samples, default_train(val_files=["3.png"]), 1)[1]] == ["3.png"]
    with pytest.raises(TrainingError, match="nope.png not in"):
        split_samples(samples, default_train(val_files=["nope.png"]), 1)
    with pytest.raises(TrainingError, match="no image to train on"):
        split_samples(samples[:1], default_train(val_fraction=0.5), 1)
    assert split_samples(samples, default_train(), 1) == (samples, [])


def test_validation_loss_is_deterministic_and_tracks_the_weights(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd")
    report = build_cache(cfg)
    valset = ValidationSet(report, report.samples[:2], seed=0, draws=3)
    module = KolorsLoraModule.from_config(cfg)
    torch.manual_seed(123)  # the global generator must not matter
    first = valset.loss(module)
    torch.randn(10)
    assert valset.loss(module) == first
    assert ValidationSet(report, report.samples[:2], seed=0, draws=3).loss(module) == first
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    assert valset.loss(module) != first


def test_validation_split_early_stopping_and_best_export(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd")
    # a learning rate far too high makes the held-out loss climb: early stopping must fire
    # (2.0 reached NaN first once the tiny VAE gave latents of the real spread)
    result = train_lora(cfg, steps=12, lr=1.0, val_files=["img_3.png"], val_every=2, early_stop_patience=2,
                        **FAST)
    val = result.val_losses
    assert val[0][0] == 0 and [s for s, _ in val] == list(range(0, result.stopped_at + 1, 2))
    assert result.stopped_at is not None and result.stopped_at < 12
    assert len(result.losses) == result.stopped_at  # loss.csv: one row per step trained
    best_step, best = min(val, key=lambda r: (r[1], r[0]))
    assert result.best_step == best_step
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == str(best_step) and float(meta["val_loss"]) == pytest.approx(best, rel=1e-6)
    assert (cfg.lora_dir / "kolors_lora.last.safetensors").is_file()
    assert (cfg.lora_dir / "kolors_lora.best.safetensors").is_file()
    fig = result.loss_plot()
    assert any("validation" in line.get_label() for line in fig.axes[0].get_lines())
    # a resumed call after the early stop trains nothing more
    again = train_lora(cfg, steps=12, lr=1.0, val_files=["img_3.png"], val_every=2, early_stop_patience=2,
                       **FAST)
    assert again.stopped_at == result.stopped_at and again.losses == result.losses


def test_options_that_need_a_split_say_so(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd")
    with pytest.raises(TrainingError, match="early_stop_patience needs a validation split"):
        train_lora(cfg, steps=1, early_stop_patience=2, **FAST)
    with pytest.raises(TrainingError, match="plateau needs a validation split"):
        train_lora(cfg, steps=1, lr_scheduler="plateau", **FAST)


# --------------------------------------------------------------------------- optimizers and schedules


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _library_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "prodigy"])
def test_optimizers_step_as_their_library(name: str) -> None:
    ours, theirs = _params(), _params()
    opt_a, opt_b = make_optimizer(name, ours, 1e-2), _library_optimizer(name, theirs, 1e-2)
    assert type(opt_a) is type(opt_b)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for params, opt in ((ours, opt_a), (theirs, opt_b)):
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.equal(ours[0], _params()[0])  # it moved


def test_8bit_optimizers_need_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs them")
    for name in ("adamw8bit", "lion8bit"):
        with pytest.raises(TrainingError, match="needs a CUDA GPU"):
            make_optimizer(name, _params(), 1e-3)
    with pytest.raises(TrainingError, match="not known"):
        make_optimizer("sgd", _params(), 1e-3)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"])
def test_lr_schedules_are_diffusers(name: str) -> None:
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    from diffusers.optimization import get_scheduler

    ours = torch.optim.SGD(_params(), lr=0.1)
    theirs = torch.optim.SGD(_params(), lr=0.1)
    a = make_lr_scheduler(name, ours, total_steps=20, warmup_steps=3, num_cycles=2)
    b = get_scheduler(name, theirs, num_warmup_steps=3, num_training_steps=20, num_cycles=2)
    lrs = []
    for _ in range(20):
        assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        lrs.append(ours.param_groups[0]["lr"])
        ours.step(), theirs.step(), a.step(), b.step()
    assert (len(set(lrs)) == 1) == (name == "constant")


def test_training_logs_the_schedule_and_resumes_it(base_cfg: Config, tmp_path: Path) -> None:
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    from diffusers.optimization import get_scheduler

    cfg = _cfg(base_cfg, tmp_path / "wd")
    settings = {"steps": 6, "lr": 1e-3, "optimizer": "lion", "lr_scheduler": "cosine", "lr_warmup_steps": 2,
                **FAST}
    train_lora(cfg, **settings)
    with open(cfg.loss_csv, newline="") as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    opt = torch.optim.SGD(_params(), lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert logged == pytest.approx(expected, rel=1e-6)
    state = torch.load(sorted((cfg.lora_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert state["extra"]["lr_scheduler"]["last_epoch"] == 6


def test_plateau_steps_as_torch_defines_and_resumes(base_cfg: Config, tmp_path: Path) -> None:
    # lr 2.0 on tiny: the held-out loss falls, then rises (see the early-stopping test), so the LR must drop
    settings = {"lr": 2.0, "val_files": ["img_3.png"], "val_every": 1, "lr_scheduler": "plateau",
                "plateau_factor": 0.5, "plateau_patience": 0, **FAST}
    whole = train_lora(_cfg(base_cfg, tmp_path / "a"), steps=8, **settings)
    with open(whole.loss_csv, newline="") as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    # torch's ReduceLROnPlateau fed the same validation losses in the same order (step 0 = untrained)
    opt = torch.optim.SGD(_params(), lr=2.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    expected = []
    for _, value in whole.val_losses[:-1]:
        sched.step(value)
        expected.append(opt.param_groups[0]["lr"])
    assert logged == pytest.approx(expected, rel=1e-6)
    assert len(set(logged)) > 1, "the learning rate never dropped: the test proves nothing"
    # stopped at step 4, then resumed to 8: the same learning rates and losses
    cfg = _cfg(base_cfg, tmp_path / "b")
    train_lora(cfg, steps=4, **settings)
    resumed = train_lora(cfg, steps=8, **settings)
    assert resumed.resumed_from == 4 and resumed.losses == whole.losses
    with open(resumed.loss_csv, newline="") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == logged


# --------------------------------------------------------------------------- loss


def _alphas_cumprod() -> torch.Tensor:
    """Kolors' training schedule, written out here: scaled-linear betas 0.00085..0.014 over 1100 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.014 ** 0.5, 1100, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_min_snr_and_noise_offset_change_the_loss_as_their_formulas(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd")
    report = build_cache(cfg)
    module = KolorsLoraModule.from_config(cfg)
    from kolors_lib.train.cache import load_latents, load_text

    batch = {"latents": load_latents(report.root, report.samples[0].image_key)["latents"][None],
             **{k: v[None] for k, v in load_text(report.root, report.samples[0].text_key).items()}}
    acp = _alphas_cumprod()
    for seed in range(4):
        torch.manual_seed(seed)
        plain = module.compute_loss(batch)
        torch.manual_seed(seed)
        torch.randn_like(batch["latents"])
        t = int(module.scheduler.timesteps[torch.randint(0, 1100, (1,))])
        module.options = default_train(min_snr_gamma=5.0)
        torch.manual_seed(seed)
        weighted = module.compute_loss(batch)
        snr = float(acp[t] / (1 - acp[t]))
        torch.testing.assert_close(weighted, plain * (min(snr, 5.0) / snr), rtol=1e-5, atol=0)

        # noise offset: ε + 0.1·N(0,1) per (sample, channel), drawn after the stock draws
        module.options = default_train(noise_offset=0.1)
        torch.manual_seed(seed)
        offset = module.compute_loss(batch)
        torch.manual_seed(seed)
        noise = torch.randn_like(batch["latents"])
        tid = torch.randint(0, 1100, (1,))
        noise = noise + 0.1 * torch.randn(1, 4, 1, 1)
        timestep = module.scheduler.timesteps[tid]
        a = float(acp[int(timestep)])
        noisy = a ** 0.5 * batch["latents"] + (1 - a) ** 0.5 * noise
        with torch.no_grad():
            pred = module.unet(noisy, timestep=timestep, encoder_hidden_states=batch["encoder_hidden_states"],
                               add_text_embeds=batch["add_text_embeds"],
                               add_time_id=torch.tensor([RES, RES, 0, 0, RES, RES]))
        torch.testing.assert_close(offset.detach(), ((pred - noise) ** 2).mean(), rtol=1e-4, atol=1e-6)
        module.options = default_train()


# --------------------------------------------------------------------------- buckets, variants, EMA


def test_bucket_list_and_assignment() -> None:
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes and (832, 1216) in sizes and (1216, 832) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 ** 2 and max(w / h, h / w) <= 2 for w, h in sizes)
    assert all(w * h > 0.85 * 1024 ** 2 for w, h in sizes)
    assert nearest_bucket(2000, 1000, sizes) == max(sizes, key=lambda s: s[0] / s[1])
    assert nearest_bucket(500, 500, sizes) == (1024, 1024)
    assert nearest_bucket(800, 1200, sizes) == (832, 1216)  # 2:3 keeps its shape
    small = bucket_sizes(128)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in small) and (96, 160) in small


def test_batches_never_mix_buckets() -> None:
    buckets = [(64, 64)] * 5 + [(96, 32)] * 3 + [(32, 96)]
    for epoch in range(3):
        plan = batch_plan(buckets, 2, seed=0, epoch=epoch)
        assert all(len({buckets[i] for i in b}) == 1 and len(b) == 2 for b in plan)
        assert {i for b in plan for i in b} == set(range(9))  # every image each pass
    assert batch_plan(buckets, 2, 0, 0) == batch_plan(buckets, 2, 0, 0)


def test_bucketed_training_keeps_aspect_ratios(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd", shapes=((128, 64), (64, 128), (64, 64), (130, 60)))
    cfg = dataclasses.replace(cfg, resolution=128)
    cfg.train.buckets = True
    report = build_cache(cfg)
    sizes = [s.size for s in report.samples]
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1] and sizes[2] == (128, 128)
    seen: list[tuple] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append(tuple(batch["latents"].shape))

    result = train_lora(cfg, steps=4, batch_size=2, callbacks=[Spy()], save_every=2, gradient_checkpointing=False)
    assert len(result.losses) == 4 and len(seen) == 4
    latent_sizes = {(h * 8, w * 8) for h, w in (s[-2:] for s in seen)}
    assert latent_sizes <= {(h, w) for w, h in sizes} and len(latent_sizes) > 1


from kolors_lib.train.training import L  # noqa: E402  (lightning, after the torchvision patch)


def test_variants_and_ema(base_cfg: Config, tmp_path: Path) -> None:
    cfg = _cfg(base_cfg, tmp_path / "wd")
    weights: list[dict[str, torch.Tensor]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            weights.append(pl_module.lora_state_dict())

    result = train_lora(cfg, steps=5, augment_variants=2, ema_decay=0.9, callbacks=[Record()], **FAST)
    cached = load_file(str(next((cfg.lora_dir / "cache" / "latents").glob("*.safetensors"))))
    assert set(cached) == {"latents", "variant_1", "variant_2"}
    assert not torch.equal(cached["variant_1"], cached["latents"])
    # EMA as diffusers' EMAModel defines it: decay_n = min(0.9, (1+k)/(10+k)), k = n-1, 0 at the first step
    ema = {k: v.clone() for k, v in load_file(str(result.lora_path)).items()}
    shadow = None
    for n, w in enumerate(weights, start=1):
        k = n - 1
        decay = 0.0 if k <= 0 else min(0.9, (1 + k) / (10 + k))
        shadow = {name: w[name].clone() for name in w} if shadow is None else {
            name: shadow[name] - (1 - decay) * (shadow[name] - w[name]) for name in w}
    saved = load_file(str(cfg.lora_dir / "kolors_lora.ema.safetensors"))
    assert shadow is not None and all(torch.allclose(saved[k], shadow[k], atol=1e-7) for k in saved)
    assert any(not torch.equal(saved[k], ema[k]) for k in saved)
    assert not math.isnan(result.losses[-1][1])


def test_compare_settings_trains_each_setting_on_the_same_split(base_cfg: Config, tmp_path: Path) -> None:
    from kolors_lib.train.report import val_loss_figure
    from kolors_lib.train.training import compare_settings

    cfg = _cfg(base_cfg, tmp_path / "wd")
    runs = compare_settings(cfg, {"A": {}, "B": {"lr": 5e-2, "target_modules": "attn_ff"}}, steps=4,
                            val_fraction=0.25, val_every=2, **FAST)
    a, b = runs["A"], runs["B"]
    assert a.lora_path.parent == cfg.lora_dir / "compare" / "A" / "lora"
    assert b.lora_path.parent == cfg.lora_dir / "compare" / "B" / "lora"
    assert not cfg.lora_path.exists()  # the main LoRA of step 03 is untouched
    for name in ("A", "B"):  # the same images (a link), so both hold out the same picture
        run_train = cfg.lora_dir / "compare" / name / "data" / "clean" / "train"
        assert run_train.is_symlink() and run_train.resolve() == cfg.train_dir.resolve()
    assert [s for s, _ in a.val_losses] == [s for s, _ in b.val_losses] == [0, 2, 4]
    assert a.val_losses[0] == b.val_losses[0]  # step 0 is the base model on the same held-out picture
    assert a.val_losses[1:] != b.val_losses[1:]  # the settings differ, and it shows
    fig = val_loss_figure(runs)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"A (best step {a.best_step})", f"B (best step {b.best_step})"]
    assert [list(line.get_ydata()) for line in lines] == [[v for _, v in a.val_losses], [v for _, v in b.val_losses]]
