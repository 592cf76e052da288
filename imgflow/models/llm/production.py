"""The production profile's structuring LLM: a user's GGUF (Llama-3.1-8B-Instruct Q4_K_M) from
``models.llm``; on the CPU by default (``models.llm_device``), ``models.llm_threads`` /
``models.llm_ctx`` configurable. Its ``model_id`` hashes the file cheaply (size, first and
last MiB) instead of reading ~5 GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Unpack

from imgflow.models.cache import ModelCache
from imgflow.models.llm.shipped import LlmSpec
from imgflow.models.llm.structurer import LlamaStructurer, LlmOptions
from imgflow.models.user_paths import existing, invalid, required


class GgufStructurer(LlamaStructurer):
    big_files = True
    defaults: ClassVar[LlmOptions] = {**LlamaStructurer.defaults, "n_ctx": 4096, "device": "cpu"}

    def __init__(self, cache: ModelCache, spec: str, **options: Unpack[LlmOptions]) -> None:
        path = Path(required(self.setting, spec, "Llama-3.1-8B-Instruct (a .gguf file)")).expanduser()
        super().__init__(cache, LlmSpec(path.stem, path, False, named=False), options)
        self.id_name = f"llama.cpp:{path.stem}"

    def id_files(self) -> list[Path]:
        return [self.path]

    def check(self) -> None:
        existing(self.setting, self.path, "file")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise invalid(self.setting, self.path, "not a GGUF file (llama-cpp-python needs .gguf)")
