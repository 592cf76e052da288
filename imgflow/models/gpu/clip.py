"""CLIP image vectors through open_clip_torch, from a local weights file.

``models.clip = "<model>:<weights>"``: ``<model>`` is an open_clip model name
(``ViT-L-14``; ``ViT-L-14-quickgelu`` for OpenAI's weights) or the path of an open_clip
model config ``.json`` (a custom architecture; its file name is the model name), and
``<weights>`` a ``.bin``/``.pt``/``.safetensors`` state dict, e.g.
``ViT-L-14:/models/clip/open_clip_pytorch_model.bin``. Vectors are L2-normalised float32,
``embed_dim`` wide (768 for ViT-L/14). On CUDA the forward pass runs under bf16 autocast.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.models.base import CachedModelAdapter, ImageEmbedder
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import oom_guard, resolve_device
from imgflow.models.rgb import to_rgb
from imgflow.models.user_paths import existing, invalid, required

SETTING = "clip"


def parse_spec(spec: str) -> tuple[str, Path | None, Path]:
    """(model name, config .json or None, weights path)."""
    spec = required(SETTING, spec, 'CLIP ("<open_clip model name>:<weights file>")')
    name, sep, weights = spec.partition(":")
    if not sep or not name.strip() or not weights.strip():
        raise invalid(
            SETTING, spec, 'expected "<open_clip model name or config .json>:<weights file>", e.g. "ViT-L-14:/models/clip/open_clip_pytorch_model.bin"'
        )
    name, weights_path = name.strip(), Path(weights.strip()).expanduser()
    if name.endswith(".json"):
        cfg = Path(name).expanduser()
        return cfg.stem, cfg, weights_path
    return name, None, weights_path


def _weights_look_valid(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip / legacy pickle
        return True
    return len(head) > 8 and head[8:9] == b"{"  # safetensors: u64 header size, then JSON


class _LoadedClip:
    def __init__(self, name: str, weights: Path, device: str) -> None:
        import open_clip
        import torch

        self.torch = torch
        self.device = device
        model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device, load_weights=True)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.model = None


class OpenClipImageEmbedder(CachedModelAdapter, ImageEmbedder):
    big_files = True

    def __init__(self, cache: ModelCache, spec: str, device: str = "auto") -> None:
        super().__init__(cache)
        self.name, self.config_path, self.path = parse_spec(spec)
        self.id_name = f"open_clip:{self.name}"
        self._device = device
        self._dim: int | None = None
        self.cache_key = f"clip:{self.name}:{self.path.resolve()}"

    def _register_config(self) -> None:
        if self.config_path is not None:
            import open_clip

            existing(SETTING, self.config_path, "file")
            open_clip.add_model_config(self.config_path)

    @property
    def dim(self) -> int:
        if self._dim is None:
            if self.config_path is not None:
                self._dim = int(json.loads(self.config_path.read_text())["embed_dim"])
            else:
                import open_clip

                self._dim = int(open_clip.get_model_config(self.name)["embed_dim"])
        return self._dim

    def id_files(self) -> list[Path]:
        return [self.path]

    def check(self) -> None:
        import open_clip

        self._register_config()
        if open_clip.get_model_config(self.name) is None:
            raise invalid(SETTING, self.name, "not an open_clip model name (see open_clip.list_models()) nor a model config .json")
        existing(SETTING, self.path, "file")
        if not _weights_look_valid(self.path):
            raise invalid(SETTING, self.path, "not a torch checkpoint or safetensors file")

    def _load(self) -> _LoadedClip:
        return _LoadedClip(self.name, self.path, resolve_device(self._device))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        m: _LoadedClip = self._model()
        torch = m.torch
        with m.lock, oom_guard("open_clip"), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=m.device == "cuda"):
            x = torch.stack([m.preprocess(to_rgb(img)) for img in images]).to(m.device)
            vecs = m.model.encode_image(x, normalize=True).float().cpu().numpy()
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed_query_texts(self, texts: list[str]) -> np.ndarray:
        """The text tower: a search query in the space of ``embed_images`` (L2-normalised)."""
        m: _LoadedClip = self._model()
        torch = m.torch
        with m.lock, oom_guard("open_clip"), torch.inference_mode():
            tokens = m.tokenizer(texts).to(m.device)
            vecs = m.model.encode_text(tokens, normalize=True).float().cpu().numpy()
        return np.ascontiguousarray(vecs, dtype=np.float32)
