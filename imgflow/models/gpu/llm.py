"""Structured JSON from a user's GGUF (Llama-3.1-8B-Instruct Q4_K_M) with llama-cpp-python.

The same adapter as the embedded profile's (``embedded.llm.LlamaCppStructurer``: the same
JSON-schema grammar, prompt, batched greedy decoding (``models.llm_batch`` sequences at once,
``imgflow.models.llama_batch``) and grounding rules), on a path from
``models.llm``; on the CPU by default (``models.llm_device``), ``models.llm_threads`` /
``models.llm_ctx`` configurable. Its ``model_id`` hashes the file cheaply (size, first and
last MiB) instead of reading ~5 GB.
"""

from __future__ import annotations

from pathlib import Path

from imgflow.models.cache import ModelCache
from imgflow.models.common import quick_hash
from imgflow.models.embedded.llm import LlamaCppStructurer
from imgflow.models.gpu._paths import existing, invalid, required

SETTING = "llm"


class GgufStructurer(LlamaCppStructurer):
    def __init__(
        self,
        cache: ModelCache,
        spec: str,
        n_ctx: int = 4096,
        n_threads: int = 0,
        max_tokens: int = 256,
        device: str = "cpu",
        n_parallel: int = 8,
        description: str = "auto",
    ) -> None:
        path = Path(required(SETTING, spec, "Llama-3.1-8B-Instruct (a .gguf file)")).expanduser()
        super().__init__(
            cache,
            str(path),
            path.parent,
            n_ctx=n_ctx,
            n_threads=n_threads,
            max_tokens=max_tokens,
            device=device,
            n_parallel=n_parallel,
            description=description,
        )

    def make_model_id(self) -> str:
        return f"llama.cpp:{self.path.stem}@{quick_hash([self.path])}"

    def check(self) -> None:
        existing(SETTING, self.path, "file")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise invalid(SETTING, self.path, "not a GGUF file (llama-cpp-python needs .gguf)")
