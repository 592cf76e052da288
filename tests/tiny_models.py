"""Tiny random-initialised models in the production formats, built from configs (a test
fixture; ``benchmarks/gpu_vlm_batch.py`` borrows the Qwen2-VL configs).

No VLM or CLIP weights ship anywhere, so the production (GPU-profile) code paths are tested
(and ``benchmarks/gpu_vlm_batch.py --tiny`` runs) on models written here to a folder and then
loaded back through the real adapters exactly as real weights would be:

- ``build_tiny_qwen2vl(folder)``: a ``Qwen2VLForConditionalGeneration`` with a 2-layer text
  model and a 1-block vision tower, plus a real ``Qwen2VLProcessor`` (Qwen2-VL image
  processor, a small byte-level BPE tokenizer with the Qwen2-VL special tokens, the Qwen2-VL
  chat template), saved with ``save_pretrained``;
- ``build_tiny_clip(folder)``: an open_clip model from a small model config (``.json`` written
  next to the weights), ``create_model(..., pretrained=None)``, state dict saved as
  ``open_clip_pytorch_model.bin``;
- ``build_tiny_fasttext(path)``: a gensim FastText model trained on a few sentences, saved in
  Facebook's ``.bin`` format (as ``cc.en.300.bin`` is).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL-Instruct chat template (images and text parts, system prompt by default).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A photo of a cat sitting on a red sofa next to a window.",
    "A cup of coffee on a wooden table; the sign reads HARBOR TICKET 2041.",
    "An astronaut in a white suit holding a helmet, with a flag behind.",
    "Describe this image in detail. Transcribe all the text visible in the image.",
    "system user assistant You are a helpful assistant. There is no text.",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (every byte is a token: nothing is ever unknown) with the
    Qwen2-VL special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left")
    return fast


def qwen2vl_7b_config(**overrides) -> dict:
    """The architecture of Qwen2-VL-7B-Instruct (its config.json), as kwargs for
    ``Qwen2VLConfig``; ``overrides`` go into ``text_config`` / ``vision_config``."""
    text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    text.update(overrides.get("text", {}))
    vision.update(overrides.get("vision", {}))
    return dict(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def tiny_qwen2vl_config(tokenizer=None) -> dict:
    ids = {t: (tokenizer.convert_tokens_to_ids(t) if tokenizer is not None else i) for i, t in enumerate(SPECIAL_TOKENS)}
    vocab = len(tokenizer) if tokenizer is not None else 400
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}  # head_dim 16 -> mrope sections sum to 8
    cfg = qwen2vl_7b_config(
        text=dict(vocab_size=vocab, **sizes, **special, rope_parameters=rope), vision=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    )
    cfg.update(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return cfg


def build_tiny_qwen2vl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL model + processor to ``folder`` (save_pretrained)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = Qwen2VLConfig(**tiny_qwen2vl_config(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2VL_CHAT_TEMPLATE
    )
    processor.save_pretrained(folder)
    return folder


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def build_tiny_clip(folder: str | Path, name: str = "tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """(config .json, weights .bin) of a tiny random open_clip model. Use it as
    ``models.clip = "<config.json>:<weights.bin>"``."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return cfg_path, weights


def build_tiny_fasttext(path: str | Path, seed: int = 0) -> Path:
    """A tiny gensim FastText model trained on a few sentences, in Facebook .bin format."""
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model

    sentences = [s.lower().replace(".", "").replace(";", "").replace(",", "").split() for s in _CORPUS]
    model = FastText(vector_size=16, window=3, min_count=1, min_n=3, max_n=5, bucket=2000, seed=seed, workers=1)
    model.build_vocab(corpus_iterable=sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_facebook_model(model, str(path))
    return path
