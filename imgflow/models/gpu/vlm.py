"""Qwen2-VL(-7B-Instruct) through transformers: the full description and the text seen in
the image, from one model load shared by two adapters.

Two prompts (not one prompt parsed into two fields): the description prompt and a short
transcription prompt, each one batched ``generate`` call over all images of the batch
(left padding, greedy decoding, so a fixed model gives the same text for the same image).
Both adapters get the model from the cache under one key, so it is loaded once. The
transcription answer "NONE" (no text) becomes "".

dtype: ``models.vlm_dtype`` (auto: bfloat16 on CUDA, float32 on CPU); attention:
``models.vlm_attn_implementation`` (eager | sdpa | flash_attention_2).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

from PIL import Image

from imgflow.models.base import CachedModelAdapter, Describer, Description, TextReader
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import oom_guard, resolve_device
from imgflow.models.rgb import to_rgb
from imgflow.models.user_paths import existing, invalid, required

log = logging.getLogger(__name__)

SETTING = "vlm"
DESCRIBE_PROMPT = (
    "Describe this image in detail: the main subject, what it is doing, the setting, the "
    "colours and any other objects or people. Mention any text written in the image."
)
READ_TEXT_PROMPT = "Transcribe all the text visible in this image exactly as written, line by line. If there is no text in the image, answer with exactly: NONE"
_NONE = re.compile(r"^\W*(none|no text\b.*|there is no text\b.*)\W*$", re.I | re.S)


def weight_files(folder: Path) -> list[Path]:
    """config.json plus the safetensors index and shards (or the single weights file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [index] + [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def check_folder(folder: Path) -> None:
    existing(SETTING, folder, "dir")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise invalid(SETTING, folder, "no config.json: not a transformers model folder")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise invalid(SETTING, cfg, f"unreadable config.json: {exc}") from exc
    if model_type != "qwen2_vl":
        raise invalid(SETTING, folder, f"config.json has model_type {model_type!r}, expected 'qwen2_vl'")
    files = weight_files(folder)
    if not files:
        raise invalid(SETTING, folder, "no model.safetensors(.index.json) or pytorch_model.bin")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise invalid(SETTING, folder, f"weight shards missing: {missing}")
    if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        raise invalid(SETTING, folder, "no preprocessor_config.json / processor_config.json (the image processor)")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        raise invalid(SETTING, folder, "no tokenizer.json / vocab.json (the tokenizer)")


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


class LoadedVlm:
    """The cache entry: model + processor, calls serialised (one GPU, one generate at a time)."""

    def __init__(self, folder: Path, device: str, dtype: str, attn: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        self.torch = torch
        self.device = device
        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        self.model = (
            Qwen2VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=torch_dtype(dtype, device), attn_implementation=attn or None, local_files_only=True
            )
            .to(device)
            .eval()
        )
        self.lock = threading.Lock()

    def generate(self, images: list[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        if not images:
            return []
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        torch = self.torch
        with self.lock, oom_guard("qwen2-vl"), torch.inference_mode():
            inputs = self.processor(text=[text] * len(images), images=[to_rgb(i) for i in images], padding=True, return_tensors="pt").to(self.device)
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            del inputs, out
            return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def close(self) -> None:
        self.model = None
        self.processor = None


class _Qwen2Vl(CachedModelAdapter):
    big_files = True

    def __init__(
        self, cache: ModelCache, spec: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa", max_new_tokens: int = 256
    ) -> None:
        super().__init__(cache)
        self.path = Path(required(SETTING, spec, "Qwen2-VL-7B-Instruct (a transformers folder)")).expanduser()
        self.id_name = f"qwen2-vl:{self.path.name}"
        self._device = device
        self.dtype = dtype
        self.attn = attn_implementation
        self.max_new_tokens = max_new_tokens
        self.cache_key = f"vlm:{self.path.resolve()}"  # one load for both jobs

    def id_files(self) -> list[Path]:
        return [self.path / "config.json"] + weight_files(self.path)

    def check(self) -> None:
        check_folder(self.path)

    def _load(self) -> LoadedVlm:
        return LoadedVlm(self.path, resolve_device(self._device), self.dtype, self.attn)


class Qwen2VlDescriber(_Qwen2Vl, Describer):
    """``describe(images, seen_text)``: the VLM reads the image itself, so ``seen_text`` is
    not used; labels are [] (no classifier)."""

    def describe(self, images: list[Image.Image], seen_text: list[str], text_areas: list[float | None] | None = None) -> list[Description]:
        if len(seen_text) != len(images):
            raise ValueError("seen_text must have one entry per image")
        texts = self._model().generate(images, DESCRIBE_PROMPT, self.max_new_tokens)
        return [Description(t, []) for t in texts]


class Qwen2VlTextReader(_Qwen2Vl, TextReader):
    def read_text(self, images: list[Image.Image]) -> list[str]:
        texts = self._model().generate(images, READ_TEXT_PROMPT, self.max_new_tokens)
        return ["" if _NONE.match(t) else t for t in texts]
