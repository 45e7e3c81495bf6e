"""A tiny random-weight Qwen2-VL written in the layout of ModelScope's Qwen/Qwen2-VL-2B-Instruct.

Same class (`Qwen2VLForConditionalGeneration`), same file names (config.json, generation_config.json,
model.safetensors, tokenizer.json + vocab.json + merges.txt + tokenizer_config.json,
preprocessor_config.json, chat_template.json), same special tokens and chat template, so step 02's
captioning loads it with the code that loads the real model. The tokenizer is a small byte-level BPE
trained offline on a few Chinese and ASCII lines; everything is deterministic from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Qwen2-VL's added tokens, in their order (ids follow the BPE vocabulary, as in the real tokenizer)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen/Qwen2-VL-2B-Instruct chat_template.json
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL-2B-Instruct's sizes are text 1536 x 28 layers, vision 1280 x 32 blocks; these keep the
# structure (GQA, M-RoPE sections, 2x2 patch merger, 14-pixel patches) at a few hundred k parameters
TINY_VLM = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "mrope_section": [2, 1, 1]},
    "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    "bpe_vocab": 600,
}

# the tokenizer's training text: the caption instruction's characters, common caption words, ASCII
_CORPUS = [
    "用一句中文描述这张图片的内容：人物、动作、物体和场景。不要描述画风。",
    "一个女孩站在樱花树下，穿着红色的裙子，背景是蓝天和白云。",
    "一位黑色长发少女坐在窗边看书，桌上有一杯茶和一只猫。",
    "城市夜景，霓虹灯下的街道，行人撑着雨伞走过。",
    "山水之间有一座小屋，河边停着一条小船，远处是群山。",
    "古风，水墨画，一个少年骑着白马穿过竹林。",
    "You are a helpful assistant. A girl with red hair, a cat, a street at night, anime.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:;!?()[]{}<>-_/'\"",
]


def _tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE like Qwen2's (same pre-tokenizer and decoder), trained on `_CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def write_tiny_tokenizer(folder: Path) -> dict[str, int]:
    """Qwen2TokenizerFast files (with Qwen2-VL's special tokens and chat template); returns their ids."""
    from transformers import Qwen2TokenizerFast

    base = _tokenizer(TINY_VLM["bpe_vocab"])
    fast = Qwen2TokenizerFast(tokenizer_object=base, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
                              model_max_length=32768, split_special_tokens=False)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def tiny_vlm_config(ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen2-VL's config at the tiny sizes, with the token ids of the tiny tokenizer."""
    from transformers import Qwen2VLConfig

    text, vision = TINY_VLM["text"], TINY_VLM["vision"]
    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"], "num_hidden_layers": text["num_hidden_layers"],
            "num_attention_heads": text["num_attention_heads"], "num_key_value_heads": text["num_key_value_heads"],
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": text["mrope_section"]},
            "tie_word_embeddings": True, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={"depth": vision["depth"], "embed_dim": vision["embed_dim"], "hidden_size": text["hidden_size"],
                       "num_heads": vision["num_heads"], "mlp_ratio": vision["mlp_ratio"], "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True, torch_dtype="float32",
    )


def write_tiny_vlm(folder: str | Path, seed: int = 0, max_pixels: int = 4 * 28 * 28) -> Path:
    """Write the tiny random Qwen2-VL (weights, tokenizer, processor, chat template) into `folder`."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()  # transformers' Qwen2-VL image code imports torchvision
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_tokenizer(folder)
    vocab = max(ids.values()) + 1
    config = tiny_vlm_config(ids, vocab)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # at the usual 0.02 a random model only ever emits "\n"; 0.2 gives varied (nonsense) captions
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    # greedy and short: the real model's sampling settings would make tests depend on the RNG
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                     eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False,
                     max_new_tokens=8).save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=max(max_pixels, 4 * 28 * 28)).save_pretrained(folder)
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
