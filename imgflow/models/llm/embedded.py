"""The embedded profile's structuring LLM: a small instruct GGUF shipped in a package, chosen
by name (``llm.shipped``), or a path to a .gguf (``models.llm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Unpack

from imgflow.models.base import ModelConfigError
from imgflow.models.cache import ModelCache
from imgflow.models.hashing import short_hash
from imgflow.models.llm.shipped import QWEN_SHA256, SETTING, ensure_qwen_gguf, qwen_parts, resolve_llm
from imgflow.models.llm.structurer import LlamaStructurer, LlmOptions


class LlamaCppStructurer(LlamaStructurer):
    def __init__(self, cache: ModelCache, spec: str = "", models_dir: Path | str = ".", **options: Unpack[LlmOptions]) -> None:
        super().__init__(cache, resolve_llm(spec, Path(models_dir)), options)

    def make_model_id(self) -> str:
        if self.llm_spec.joined:  # known without joining or hashing 490 MB
            return f"{self.llm_spec.name}-instruct-q4@{QWEN_SHA256[:12]}"
        return f"{self.llm_spec.name}@{short_hash([self.path])}"

    def check(self) -> None:
        if self.llm_spec.joined:
            qwen_parts()
            return
        if not self.path.is_file():
            raise ModelConfigError(f"{SETTING} points at {self.path}, which is not a file")

    def gguf_path(self) -> Path:
        return ensure_qwen_gguf(self.path.parent) if self.llm_spec.joined else self.path
