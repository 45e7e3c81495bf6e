"""LoRA export: DiffSynth/peft, diffusers and kohya files give the same UNet output at strength 1.0."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.errors import LoraFormatError, LoraMismatchError
from kolors_lib.kolors.lora import (
    FORMATS,
    convert_lora,
    detect_format,
    diffsynth_lora_alpha,
    export_lora,
    load_lora,
    merge_lora,
    module_map,
    parse_lora,
    save_lora,
)
from kolors_lib.kolors.models import load_model_manager

patch_torchvision()

RANK, ALPHA = 4, 2.0
TARGETS = ["to_q", "to_k", "to_v", "to_out"]
META = {"rank": RANK, "alpha": ALPHA, "base_model": "Kwai-Kolors/Kolors", "trigger_word": "水墨少女",
        "train": {"steps": 30, "learning_rate": 1e-4, "resolution": 1024}}


@pytest.fixture(scope="module")
def base_unet(tiny_unet_root: Path) -> torch.nn.Module:
    manager = load_model_manager([tiny_unet_root / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"])
    return manager.fetch_model("sdxl_unet").eval()


def run_diffsynth(unet: torch.nn.Module, unet_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    sample, t, text, time_ids, pooled = unet_inputs
    with torch.no_grad():
        return unet(sample, t, text, time_ids, pooled)


def run_diffusers(unet: torch.nn.Module, unet_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    sample, t, text, time_ids, pooled = unet_inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=text,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


@pytest.fixture(scope="module")
def peft_unet(base_unet: torch.nn.Module) -> torch.nn.Module:
    """The DiffSynth UNet with a random LoRA injected by peft the way DiffSynth's trainer does."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(base_unet)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
    model = inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def trained(peft_unet: torch.nn.Module, unet_inputs: tuple) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the LoRA state dict as DiffSynth's trainer saves it, y_ref = output of the peft-injected UNet)."""
    state = {k: v.detach().clone() for k, v in peft_unet.named_parameters() if ".lora_" in k}
    return state, run_diffsynth(peft_unet, unet_inputs)


def peft_output_at(peft_unet: torch.nn.Module, unet_inputs: tuple, strength: float) -> torch.Tensor:
    """peft's own forward with every LoRA layer's scaling multiplied by `strength`."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_unet.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.scaling["default"] *= strength
    try:
        return run_diffsynth(peft_unet, unet_inputs)
    finally:
        for layer in layers:
            layer.scaling["default"] /= strength


@pytest.fixture(scope="module")
def y_base(base_unet: torch.nn.Module, unet_inputs: tuple) -> torch.Tensor:
    return run_diffsynth(base_unet, unet_inputs)


@pytest.fixture(scope="module")
def _work_unet(base_unet: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    return copy.deepcopy(base_unet), {k: v.clone() for k, v in base_unet.state_dict().items()}


@pytest.fixture
def unet(_work_unet: tuple) -> torch.nn.Module:
    """A DiffSynth UNet with the base weights (restored after each test; deepcopy is slow)."""
    model, weights = _work_unet
    model.load_state_dict(weights)
    return model


@pytest.fixture
def diffusers_unet(tiny_unet_root: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_unet_root / "Kolors/unet", variant="fp16").eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- key mapping


def test_module_map_is_derived_and_matches_the_known_layout() -> None:
    from diffsynth.models.sdxl_unet import SDXLUNet

    mapping = module_map()
    with torch.device("meta"):
        real = {k.removesuffix(".weight") for k in SDXLUNet(is_kolors=True).state_dict()}
    assert set(mapping) <= real
    attn = {m for m in mapping if m.rsplit(".", 1)[-1] in TARGETS}
    assert len(attn) == 70 * 2 * 4  # 70 transformer blocks, attn1 + attn2, q/k/v/out
    blocks = sorted({int(m.split(".")[1]) for m in attn})
    assert blocks == [7, 10, 15, 18, 21, 25, 28, 31, 35, 38, 41]
    expected = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
                "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "up_blocks.1.attentions.0",
                "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    for block, path in zip(blocks, expected, strict=True):
        assert mapping[f"blocks.{block}.transformer_blocks.0.attn1.to_q"] == (
            f"{path}.transformer_blocks.0.attn1.to_q")
        assert mapping[f"blocks.{block}.transformer_blocks.0.attn2.to_out"] == (
            f"{path}.transformer_blocks.0.attn2.to_out.0")


def test_the_trainer_lora_has_the_expected_keys(trained: tuple) -> None:
    state, _ = trained
    assert len(state) == 70 * 2 * 4 * 2
    assert "blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in state
    assert detect_format(state) == "diffsynth"
    for fmt in FORMATS:
        out, meta = convert_lora(state, fmt, META)
        assert detect_format(out) == fmt and meta["format"] == fmt
        assert meta["rank"] == RANK and meta["alpha"] == ALPHA
    diffusers, _ = convert_lora(state, "diffusers", META)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in diffusers
    kohya, _ = convert_lora(state, "kohya", META)
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_k.lora_up.weight" in kohya
    assert kohya["lora_unet_mid_block_attentions_0_transformer_blocks_9_attn1_to_v.alpha"].item() == ALPHA


# ---------------------------------------------------------------- strength and merging


def test_the_lora_changes_the_output(trained: tuple, y_base: torch.Tensor) -> None:
    _, y_ref = trained
    assert (y_ref - y_base).abs().max() > 1e-2


def test_merge_matches_peft_and_strength_scales(_work_unet: tuple, peft_unet: torch.nn.Module,
                                                trained: tuple, unet_inputs: tuple, y_base: torch.Tensor) -> None:
    state, y_ref = trained
    unet, weights = _work_unet
    outputs = {}
    for strength in (1.0, 0.5):
        unet.load_state_dict(weights)
        assert merge_lora(unet, state, strength, alpha=ALPHA) == 560
        outputs[strength] = run_diffsynth(unet, unet_inputs)
    close(outputs[1.0], y_ref)
    unet.load_state_dict(weights)
    merge_lora(unet, state, 0.0, alpha=ALPHA)
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items()), "strength 0 = base model"
    half = outputs[0.5]
    assert (half - y_base).abs().max() > 1e-3 and (half - y_ref).abs().max() > 1e-3
    close(half, peft_output_at(peft_unet, unet_inputs, 0.5))


def test_merge_needs_alpha_for_a_peft_state_dict(unet: torch.nn.Module, trained: tuple) -> None:
    with pytest.raises(LoraFormatError, match="alpha"):
        merge_lora(unet, trained[0], 1.0)


def test_diffsynth_own_loader_with_the_matching_lora_alpha(tiny_unet_root: Path, trained: tuple,
                                                           unet_inputs: tuple) -> None:
    state, y_ref = trained
    manager = load_model_manager([tiny_unet_root / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"])
    assert diffsynth_lora_alpha(1.0, RANK, ALPHA) == ALPHA / RANK
    manager.load_lora("", state_dict=state, lora_alpha=diffsynth_lora_alpha(1.0, RANK, ALPHA))
    close(run_diffsynth(manager.fetch_model("sdxl_unet"), unet_inputs), y_ref)


# ---------------------------------------------------------------- diffusers


def test_diffusers_adapter_weight_means_the_same_strength(
        unet: torch.nn.Module, trained: tuple, unet_inputs: tuple, diffusers_unet: torch.nn.Module) -> None:
    state, _ = trained
    lora, _ = convert_lora(state, "diffusers", META)
    diffusers_unet.load_lora_adapter(lora, prefix="unet", adapter_name="style")
    diffusers_unet.set_adapters(["style"], weights=[0.5])
    merge_lora(unet, state, 0.5, alpha=ALPHA)
    close(run_diffusers(diffusers_unet, unet_inputs), run_diffsynth(unet, unet_inputs))


def test_diffusers_export_loads_through_kolors_pipeline_path_at_weight_1(
        trained: tuple, unet_inputs: tuple, tmp_path: Path, diffusers_unet: torch.nn.Module) -> None:
    """What KolorsPipeline.load_lora_weights runs: lora_state_dict, then load_lora_into_unet."""
    from diffusers import KolorsPipeline

    state, y_ref = trained
    src = save_lora(state, tmp_path / "lora.safetensors", META)
    path = export_lora(src, "diffusers", tmp_path / "lora_diffusers.safetensors")
    # a local file is named by folder + weight_name (a bare file path needs the Hub when offline)
    loaded, alphas = KolorsPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    assert alphas is None
    KolorsPipeline.load_lora_into_unet(loaded, alphas, diffusers_unet)
    close(run_diffusers(diffusers_unet, unet_inputs), y_ref)


# ---------------------------------------------------------------- kohya


def test_kohya_round_trip_and_delta_w(trained: tuple, tmp_path: Path) -> None:
    state, _ = trained
    src = save_lora(state, tmp_path / "lora.safetensors", META)
    out = export_lora(src, "kohya", tmp_path / "lora_kohya.safetensors")
    kohya, meta = load_lora(out)
    assert meta["format"] == "kohya" and meta["ss_network_dim"] == str(RANK)
    # independently of our parser: ΔW = alpha/rank · up · down, per key, equals peft's (alpha/r)·B·A
    mapping = module_map()
    for module in ("blocks.7.transformer_blocks.0.attn1.to_q", "blocks.41.transformer_blocks.1.attn2.to_out"):
        name = "lora_unet_" + mapping[module].replace(".", "_")
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        alpha, rank = kohya[f"{name}.alpha"].item(), down.shape[0]
        b, a = state[f"{module}.lora_B.default.weight"], state[f"{module}.lora_A.default.weight"]
        expected = ALPHA / RANK * b @ a
        close(alpha / rank * up @ down, expected)
    back, back_meta = convert_lora(kohya, "diffsynth", meta)
    assert set(back) == set(state) and back_meta["alpha"] == ALPHA and back_meta["rank"] == RANK
    for module, pair in parse_lora(state, alpha=ALPHA).items():
        close(parse_lora(back, back_meta)[module].delta(), pair.delta())
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_kohya_export_loads_in_diffusers(trained: tuple, unet_inputs: tuple, tmp_path: Path,
                                         diffusers_unet: torch.nn.Module) -> None:
    from diffusers import KolorsPipeline

    state, y_ref = trained
    lora, meta = convert_lora(state, "kohya", META)
    path = save_lora(lora, tmp_path / "k.safetensors", meta)
    loaded, alphas = KolorsPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    assert alphas and set(alphas.values()) == {ALPHA}
    KolorsPipeline.load_lora_into_unet(loaded, alphas, diffusers_unet)
    close(run_diffusers(diffusers_unet, unet_inputs), y_ref)


def test_every_format_converts_to_every_other(trained: tuple) -> None:
    state, _ = trained
    reference = parse_lora(state, alpha=ALPHA)
    for src in FORMATS:
        first, meta = convert_lora(state, src, META)
        for dst in FORMATS:
            second, meta2 = convert_lora(first, dst, meta)
            pairs = parse_lora(second, meta2)
            assert set(pairs) == set(reference)
            module = "blocks.21.transformer_blocks.3.attn2.to_v"
            close(pairs[module].delta(), reference[module].delta())


# ---------------------------------------------------------------- every target-module set (issue 12)


def _random_lora(base_unet: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    """A copy of the DiffSynth UNet with a random LoRA on `targets`, injected by peft as the trainer does."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                               target_modules=targets), copy.deepcopy(base_unet))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("preset", ["attn_ff", "all_linear"])
def test_every_target_set_round_trips_and_loads_in_diffusers(
        preset: str, base_unet: torch.nn.Module, _work_unet: tuple, unet_inputs: tuple, tmp_path: Path,
        tiny_unet_root: Path) -> None:
    from diffusers import KolorsPipeline, UNet2DConditionModel

    from kolors_lib.core.settings import TARGET_PRESETS

    targets = TARGET_PRESETS[preset]
    model = _random_lora(base_unet, targets, seed=2)
    state = {k: v.detach().clone() for k, v in model.named_parameters() if ".lora_" in k}
    y_ref = run_diffsynth(model, unet_inputs)
    attn = {k for k in state if k.split(".")[-4] in TARGETS}
    assert len(attn) == 70 * 2 * 4 * 2 and len(state) > len(attn)  # the extra layers are in the LoRA
    src = save_lora(state, tmp_path / "lora.safetensors", META)
    unet, weights = _work_unet
    for fmt in FORMATS:
        path = export_lora(src, fmt, tmp_path / f"lora_{fmt}.safetensors")
        exported, meta = load_lora(path)
        back, _ = convert_lora(exported, "diffsynth", meta)
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
        unet.load_state_dict(weights)
        assert merge_lora(unet, exported, 1.0, meta=meta) == len(state) // 2
        close(run_diffsynth(unet, unet_inputs), y_ref)
        if fmt == "diffsynth":
            continue  # diffusers reads its own and kohya's namings
        diffusers_unet = UNet2DConditionModel.from_pretrained(tiny_unet_root / "Kolors/unet", variant="fp16").eval()
        loaded, alphas = KolorsPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
        KolorsPipeline.load_lora_into_unet(loaded, alphas, diffusers_unet)
        close(run_diffusers(diffusers_unet, unet_inputs), y_ref)
    unet.load_state_dict(weights)


# ---------------------------------------------------------------- mismatches


def _broken(state: dict[str, torch.Tensor], how: str) -> tuple[dict[str, torch.Tensor], str]:
    state = dict(state)
    key = "blocks.10.transformer_blocks.1.attn2.to_k.lora_B.default.weight"
    if how == "missing":
        del state[key]
        return state, key
    if how == "missing_module":
        del state[key], state[key.replace("lora_B", "lora_A")]
        return state, key.replace("lora_B", "lora_A")
    if how == "unexpected":
        bad = "blocks.10.transformer_blocks.1.attn2.to_z"
        state[f"{bad}.lora_A.default.weight"] = torch.zeros(RANK, 64)
        state[f"{bad}.lora_B.default.weight"] = torch.zeros(64, RANK)
        return state, bad
    state[key] = torch.zeros(state[key].shape[0] + 1, RANK)
    return state, key.removesuffix(".lora_B.default.weight")


@pytest.mark.parametrize("how", ["missing", "missing_module", "unexpected", "shape"])
def test_a_lora_that_does_not_fit_raises_naming_the_key(unet: torch.nn.Module, _work_unet: tuple,
                                                        trained: tuple, how: str) -> None:
    state, name = _broken(trained[0], how)
    with pytest.raises(LoraMismatchError, match=name.replace(".", r"\.")):
        merge_lora(unet, state, 1.0, alpha=ALPHA)
    weights = _work_unet[1]
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items()), "nothing merged on error"


def test_unknown_keys_are_listed_not_dropped(trained: tuple) -> None:
    state = dict(trained[0])
    state["blocks.7.something_else"] = torch.zeros(1)
    with pytest.raises(LoraFormatError, match=r"blocks\.7\.something_else"):
        convert_lora(state, "kohya", META)
    kohya, meta = convert_lora(trained[0], "kohya", META)
    kohya["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(RANK, 8)
    with pytest.raises(LoraFormatError, match="lora_unet_down_blocks_9"):
        convert_lora(kohya, "diffsynth", meta)
    with pytest.raises(LoraFormatError, match="webui"):
        convert_lora(trained[0], "webui", META)


# ---------------------------------------------------------------- files and metadata


def test_metadata_round_trips_and_file_is_safetensors(trained: tuple, tmp_path: Path) -> None:
    state, _ = trained
    path = save_lora(state, tmp_path / "out" / "lora.safetensors", META)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"], "no temp file left"
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    assert header["__metadata__"]["format"] == "diffsynth"
    assert header["__metadata__"]["trigger_word"] == "水墨少女"
    loaded, meta = load_lora(path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert meta == {**META, "format": "diffsynth"}


def test_failed_write_keeps_old_file_and_leaves_no_temp(trained: tuple, tmp_path: Path) -> None:
    """A real full disk: a tmpfs with room for one copy of the LoRA, not two (needs root to mount)."""
    import subprocess

    size = len(save_lora(trained[0], tmp_path / "probe.safetensors", META).read_bytes())
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 64 * 1024}", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        path = save_lora(trained[0], disk / "lora.safetensors", META)
        before = path.read_bytes()
        with pytest.raises(OSError, match="No space left on device"):
            save_lora(trained[0], path, {**META, "steps": 31})  # other bytes: a real second write
        assert path.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["lora.safetensors"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_pickles_and_other_files_are_refused(trained: tuple, tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=0-step=500.ckpt"
    torch.save(trained[0], ckpt)
    with pytest.raises(LoraFormatError, match="never unpickles"):
        load_lora(ckpt)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(LoraFormatError, match="safetensors"):
        load_lora(text)
    with pytest.raises(LoraFormatError, match="alpha"):
        save_lora(trained[0], tmp_path / "x.safetensors", {"rank": RANK})
    with pytest.raises(LoraFormatError, match="kohya"):
        save_lora(trained[0], tmp_path / "y.safetensors", {**META, "format": "kohya"})


def test_export_lora_cli(trained: tuple, tmp_path: Path) -> None:
    """`python -m kolors_lib export-lora`, as a user runs it (a subprocess through the one dispatcher)."""
    src = save_lora(trained[0], tmp_path / "lora.safetensors", META)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kolors_lib", "export-lora", *args], capture_output=True,
                              text=True, timeout=300)

    done = cli(str(src), "--format", "kohya", str(out_dir))
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip().splitlines()[-1])
    assert written == out_dir / "lora.kohya.safetensors" and detect_format(load_lora(written)[0]) == "kohya"
    missing = cli(str(tmp_path / "missing.safetensors"), "--format", "diffusers", str(out_dir))
    assert missing.returncode == 2 and missing.stderr.startswith("error: LoRA file not found")
    assert "Traceback" not in missing.stderr
