"""What both profiles' LLM adapters share: a GGUF loaded with llama-cpp-python, decoded in
batches (``models.llm_batch`` sequences at once, ``engine.BatchGenerator``) under the
JSON-schema grammar (``prompt``), greedy, and its answers grounded (``answer``, ``grounding``).

The subclasses say only where the GGUF is and how it is named and checked:
``embedded.LlamaCppStructurer`` (the shipped models, by name) and
``production.GgufStructurer`` (a user's GGUF, e.g. Llama-3.1-8B-Instruct).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from imgflow.models.base import CachedModelAdapter, ModelConfigError, StructureInput, TextStructurer
from imgflow.models.cache import ModelCache
from imgflow.models.categories import CATEGORY_NAMES
from imgflow.models.llm import grounding
from imgflow.models.llm.answer import StructuringError, validate
from imgflow.models.llm.prompt import Grammars, messages
from imgflow.models.llm.shipped import LlmSpec

SEED = 0


class LlmOptions(TypedDict, total=False):
    """How the GGUF runs (the ``models.llm_*`` settings); a subclass's ``defaults`` fill the gaps."""

    n_ctx: int  # tokens per sequence
    n_threads: int  # 0: half the cores
    max_tokens: int
    device: str  # auto, cpu or cuda
    n_parallel: int  # sequences decoded at once
    description: str  # who writes the caption: auto, llm or facts


class _LoadedLlm:
    """The cache entry: a Llama (weights, tokenizer, chat template) plus a BatchGenerator
    (its own context, ``n_parallel`` sequences) under the schema grammar; calls serialised.

    The Llama's own context is never decoded with, so it is made small; the generator's
    context copies its parameters and has ``n_ctx`` tokens per sequence."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, n_gpu_layers: int, n_parallel: int = 1, describe: bool = True, max_threads: int = 0) -> None:
        from llama_cpp import Llama

        from imgflow.models.llm.chat import common_prefix, render_chat
        from imgflow.models.llm.engine import BatchGenerator

        # n_threads_batch = n_threads: llama.cpp uses n_threads_batch for every decode of more
        # than one token (every batched step); its default (all cores) oversubscribes a machine
        # shared with the vision stage, where spinning threads are many times slower.
        self.llm: Any = Llama(
            model_path=str(path), n_ctx=min(n_ctx, 512), n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, seed=SEED, verbose=False
        )
        self.describe = describe
        self.grammars = Grammars(describe)
        self.grammar = self.grammars.for_candidates(CATEGORY_NAMES)
        self.render = lambda msgs: render_chat(self.llm, msgs)
        # The prefix every prompt shares (template + system prompt), evaluated once.
        a, b = self.render(messages("a", describe)).tokens, self.render(messages("b", describe)).tokens
        try:
            self.generator: BatchGenerator | None = BatchGenerator(
                self.llm, self.grammar, n_parallel, n_ctx, n_threads, n_threads, prefix=a[: common_prefix(a, b)], max_threads=max_threads
            )
        except BaseException:
            self.llm.close()
            raise
        self.lock = threading.Lock()

    def close(self) -> None:
        generator, self.generator = getattr(self, "generator", None), None
        if generator is not None:
            generator.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()


class LlamaStructurer(CachedModelAdapter, TextStructurer):
    """A GGUF through llama.cpp. A subclass gives ``llm_spec`` (where the GGUF is), its
    ``model_id`` and ``check``."""

    setting = "llm"
    defaults: ClassVar[LlmOptions] = {"n_ctx": 2048, "n_threads": 0, "max_tokens": 256, "device": "auto", "n_parallel": 8, "description": "auto"}

    def __init__(self, cache: ModelCache, llm_spec: LlmSpec, options: LlmOptions) -> None:
        super().__init__(cache)
        self.llm_spec = llm_spec
        o: LlmOptions = {**self.defaults, **options}
        n_threads, device, description = o["n_threads"], o["device"], o["description"]
        self.n_ctx = o["n_ctx"]
        # Default: half the cores. llama.cpp's threads spin while they wait; sharing every core
        # with the vision stage's (also spinning) torch threads made generation 10-100x slower
        # in a one-machine pipeline (a batch of 8 took over 10 minutes instead of ~30 s).
        self.n_threads = n_threads if n_threads > 0 else max(1, (os.cpu_count() or 2) // 2)
        # ... and by default every core while the other processes leave them idle (the
        # pipeline's start and tail): llm.idle_cores.IdleCores. A set llm_threads is fixed.
        self.max_threads = 0 if n_threads > 0 or device == "cuda" else len(os.sched_getaffinity(0))
        self.max_tokens = o["max_tokens"]
        self.n_parallel = max(1, o["n_parallel"])  # sequences decoded at once (models.llm_batch)
        self.n_gpu_layers = -1 if device == "cuda" else 0
        if description not in ("auto", "llm", "facts"):
            raise ModelConfigError(f"models.llm_description = {description!r}: expected auto, llm or facts")
        # auto: a user's GGUF (the production Llama-3.1-8B) writes the caption; the shipped
        # small models do not: measured on the quality set, Qwen2.5-Coder-0.5B's captions added
        # facts no model reported ("commonly used in the UK", "lush greenery") or claimed text
        # that was not read, so its caption would be the facts' one anyway, at ~40 % more tokens.
        self.writes_description = description == "llm" or (description == "auto" and not self.llm_spec.named)
        key = f"llm:{llm_spec.name}" if llm_spec.named else f"llm:{llm_spec.path}"
        key += f"@{self.n_parallel}x{self.n_ctx}"  # one loaded context shape per key
        self.cache_key = key + ("+description" if self.writes_description else "")  # another prompt and grammar

    @property
    def path(self) -> Path:
        return self.llm_spec.path

    def gguf_path(self) -> Path:
        """The file to load (a subclass may have to make it first)."""
        return self.path

    def _load(self) -> _LoadedLlm:
        return _LoadedLlm(self.gguf_path(), self.n_ctx, self.n_threads, self.n_gpu_layers, self.n_parallel, self.writes_description, self.max_threads)

    @staticmethod
    def prompt(item: StructureInput) -> str:
        return grounding.notes(item)

    def structure(self, items: list[StructureInput]) -> list[dict]:
        out = []
        for result in self.structure_each(items):
            if isinstance(result, Exception):
                raise result
            out.append(result)
        return out

    def structure_each(self, items: list[StructureInput]) -> list[dict | Exception]:
        """All items decoded together (``models.llm_batch`` at a time, a finished one's slot
        refilled at once); an item whose answer is invalid gets its exception, the others
        their dicts."""
        if not items:
            return []
        m: _LoadedLlm = self._model()
        with m.lock:
            assert m.generator is not None  # closed only when the cache evicts it
            prompts = []
            for item in items:
                p = m.render(messages(self.prompt(item), m.describe))
                prompts.append(replace(p, grammar=m.grammars.for_item(item)))
            generations = m.generator.generate(prompts, self.max_tokens)
        out: list[dict | Exception] = []
        for item, gen in zip(items, generations):
            if isinstance(gen, Exception):
                out.append(StructuringError(f"LLM: {gen}"))
                continue
            try:
                out.append(validate(gen.text, item, truncated=gen.finish_reason == "length", describe=m.describe))
            except StructuringError as exc:
                out.append(exc)
        return out
