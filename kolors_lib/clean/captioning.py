"""Chinese captions for step 02: a Data-Juicer mapper running a vision-language model (Qwen2-VL).

Data-Juicer's own captioning ops do not fit (`image_captioning_mapper` writes English with BLIP-2,
`mllm_mapper` echoes its prompt), so this module registers `kolors_caption_mapper` with Data-Juicer's
operator registry. Importing it is enough; step 02 does so before Data-Juicer reads the recipe, and
Ray workers import it when they unpickle the op. The model folder, mode and instruction come from
the course config (`models.captioner`, `filter.caption_*`), filled in by `kolors_lib.clean.model_ops`.

Modes: `fill` captions the samples whose text is empty (step 02 empties the placeholder caption
first), `replace` captions every sample; `keep` never reaches Data-Juicer (the op is left out).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_juicer.ops.base_op import OPERATORS, Mapper

OP_NAME = "kolors_caption_mapper"
MODES = ("fill", "replace")
# one model per (folder, device) and process: Data-Juicer calls the op batch after batch
_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_JUNK = re.compile(r"[\x00-\x1f\x7f\ufffd]+")


def clean_caption(text: str) -> str:
    """One line: control characters and undecodable bytes dropped, whitespace collapsed."""
    return re.sub(r"\s+", " ", _JUNK.sub(" ", text)).strip()


def _dtype(device: str) -> Any:
    """bf16 on GPUs that have it, fp16 on older ones (T4), fp32 on CPU."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_captioner(folder: str | Path, device: str = "cpu", max_pixels: int | None = None) -> tuple[Any, Any]:
    """Qwen2-VL (real or tiny: same files, same classes) and its processor, cached per process."""
    key = (str(folder), device)
    if key not in _MODELS:
        from kolors_lib.core.compat import offline_hubs, patch_torchvision

        patch_torchvision()  # transformers' Qwen2-VL image code imports torchvision
        with offline_hubs():  # a local folder: nothing to ask the hub
            from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

            sizes = {"max_pixels": max_pixels} if max_pixels else {}
            processor = AutoProcessor.from_pretrained(str(folder), use_fast=True, **sizes)
            model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder), dtype=_dtype(device))
        processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
        _MODELS[key] = (model.to(device).eval(), processor)
    return _MODELS[key]


def caption_images(images: list[Any], folder: str | Path, instruction: str, device: str = "cpu",
                   batch_size: int = 4, max_new_tokens: int = 64, max_pixels: int | None = None,
                   progress: bool = True) -> list[str]:
    """One cleaned caption per PIL image, generated greedily in batches."""
    import torch

    from kolors_lib.core.console import progress as tqdm

    if not images:
        return []
    model, processor = load_captioner(folder, device, max_pixels)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out: list[str] = []
    size = max(1, int(batch_size))
    with tqdm(total=len(images), desc="caption images", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), size):
            batch = [im.convert("RGB") for im in images[start:start + size]]
            inputs = processor(text=[prompt] * len(batch), images=batch, return_tensors="pt", padding=True)
            with torch.no_grad():
                ids = model.generate(**inputs.to(model.device), max_new_tokens=int(max_new_tokens),
                                     do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.extend(clean_caption(t) for t in processor.batch_decode(new, skip_special_tokens=True))
            bar.update(len(batch))
    return out


@OPERATORS.register_module(OP_NAME)
class KolorsCaptionMapper(Mapper):
    """Write a Chinese caption for each sample's image with a Qwen2-VL model.

    In `fill` mode only samples with an empty text are captioned; in `replace` mode all of them.
    A generated caption that comes out empty leaves the sample's text as it was."""

    _batched_op = True
    _accelerator = "cpu"

    def __init__(
        self,
        model_path: str = "",
        mode: str = "fill",
        instruction: str = "用一句中文描述这张图片的内容。",
        gen_batch_size: int = 4,
        max_new_tokens: int = 64,
        max_pixels: int = 0,
        device: str = "cpu",
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param model_path: folder of a Qwen2-VL model (ModelScope layout).
        :param mode: 'fill' (caption samples without text) or 'replace' (caption all).
        :param instruction: the user message sent with each image.
        :param gen_batch_size: images per generate() call.
        :param max_new_tokens: caption length limit in tokens.
        :param max_pixels: resize images to at most this many pixels (0: the processor's own limit).
        :param device: torch device, e.g. 'cpu' or 'cuda:0'.
        :param args: extra args
        :param kwargs: extra args
        """
        # a GPU device makes it a CUDA op for Data-Juicer (Ray actors with a GPU)
        kwargs.setdefault("accelerator", "cuda" if str(device).startswith("cuda") else "cpu")
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise ValueError(f"{OP_NAME}: mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not model_path:
            raise ValueError(f"{OP_NAME}: model_path is required (step 02 fills it from models.captioner)")
        self.model_path = str(model_path)
        self.mode = mode
        self.instruction = instruction
        self.gen_batch_size = int(gen_batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_pixels = int(max_pixels) or None
        self.device = str(device)

    def process_batched(self, samples: dict[str, list[Any]], rank: int | None = None) -> dict[str, list[Any]]:
        """Caption the batch's samples that need one; other samples pass through unchanged."""
        from data_juicer.utils.mm_utils import load_image

        texts = list(samples[self.text_key])
        todo = [i for i, text in enumerate(texts)
                if samples[self.image_key][i] and (self.mode == "replace" or not str(text or "").strip())]
        images = [load_image(samples[self.image_key][i][0]) for i in todo]
        captions = caption_images(images, self.model_path, self.instruction, self.device, self.gen_batch_size,
                                  self.max_new_tokens, self.max_pixels)
        for i, caption in zip(todo, captions, strict=True):
            if caption:
                texts[i] = caption
        samples[self.text_key] = texts
        return samples
