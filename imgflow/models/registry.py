"""Pick model implementations by ``settings.models.profile`` and the per-job overrides.

``REGISTRY[profile][job]`` maps an implementation name to a factory
``factory(settings, cache, spec) -> adapter``; ``DEFAULTS[profile][job]`` names the one used
when the job's override setting is empty. An override (``models.<setting>``) that is a
registered name picks that implementation (``spec`` = ""); any other value is handed to the
profile's default factory as ``spec`` (e.g. a path to a .gguf for ``models.llm``), and a
factory that takes no spec raises ModelConfigError naming the setting.

To add a profile: ``register("gpu", "describe", "qwen2-vl", factory, default=True)`` for
each job (see ``JOBS``).

Mixing profiles, per job (``build_adapter``):
1. an override that names an implementation of *any* profile picks it (the current
   profile's first), e.g. ``describe = "composed"`` under the gpu profile;
2. any other non-empty override is the spec of the profile's default (a path);
   under the embedded profile a ``word_vectors`` path picks gensim (production);
3. otherwise, under the embedded profile, a set production source (``models.vlm`` for
   describe and read_text, ``models.clip``, ``models.sentence``) picks the production
   implementation of that job;
4. otherwise the profile's default; the gpu defaults read their source settings and
   name the setting when it is empty.
Every adapter is ``check()``-ed when the stage's models are built (``setup``, before any
message is consumed), so a wrong path stops the stage at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from imgflow.models.base import (
    Describer,
    ImageEmbedder,
    ModelAdapter,
    ModelConfigError,
    TextEmbedder,
    TextReader,
    TextStructurer,
    WordVectorizer,
)
from imgflow.models.cache import ModelCache, get_model_cache
from imgflow.models.cuda import configure_cuda_allocator
from imgflow.settings import ModelSettings, Settings

if TYPE_CHECKING:
    from imgflow.models.llm.structurer import LlmOptions

# job name (ModelAdapter.job) -> the ModelSettings field that overrides it
JOBS: dict[str, str] = {
    "describe": "describe",
    "read_text": "read_text",
    "embed_image": "embed_image",
    "embed_text": "embed_text",
    "word_vectors": "word_vectors",
    "structure_text": "llm",
}
# job -> the ModelSettings field naming the production model's source (a path)
PRODUCTION_SOURCES: dict[str, str] = {
    "describe": "vlm",
    "read_text": "vlm",
    "embed_image": "clip",
    "embed_text": "sentence",
    "word_vectors": "word_vectors",
    "structure_text": "llm",
}
VISION_JOBS = ("describe", "read_text", "embed_image", "embed_text", "word_vectors")

Factory = Callable[[Settings, ModelCache, str], ModelAdapter]

REGISTRY: dict[str, dict[str, dict[str, Factory]]] = {}
DEFAULTS: dict[str, dict[str, str]] = {}


@dataclass
class VisionModels:
    describer: Describer
    reader: TextReader
    image_embedder: ImageEmbedder
    text_embedder: TextEmbedder
    word_vectorizer: WordVectorizer


@dataclass
class EnrichModels:
    structurer: TextStructurer


def register(profile: str, job: str, name: str, factory: Factory, default: bool = False) -> None:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r} (known: {sorted(JOBS)})")
    REGISTRY.setdefault(profile, {}).setdefault(job, {})[name] = factory
    if default or job not in DEFAULTS.get(profile, {}):
        DEFAULTS.setdefault(profile, {})[job] = name


def setting_name(job: str) -> str:
    field = JOBS[job]
    return f"models.{field} (IMGFLOW_MODELS__{field.upper()})"


def build_adapter(settings: Settings, job: str, cache: ModelCache | None = None) -> ModelAdapter:
    """One job's adapter (nothing is loaded)."""
    profile = settings.models.profile
    if profile not in REGISTRY:
        raise ModelConfigError(f"profile {profile!r} (models.profile / IMGFLOW_MODELS__PROFILE) is not implemented yet; available: {sorted(REGISTRY)}")
    impls = REGISTRY[profile].get(job)
    if not impls:
        raise ModelConfigError(f"profile {profile!r} has no implementation for job {job!r}")
    cache = cache if cache is not None else get_model_cache(settings)
    override = getattr(settings.models, JOBS[job]).strip()
    for p in [profile] + [p for p in REGISTRY if p != profile]:
        named = REGISTRY[p].get(job, {})
        if override in named:
            return named[override](settings, cache, "")
    if override:
        if profile == "embedded" and job == "word_vectors":
            return _gensim(settings, cache, override)
        return impls[DEFAULTS[profile][job]](settings, cache, override)
    source = PRODUCTION_SOURCES.get(job)
    if profile != "gpu" and source and getattr(settings.models, source).strip():
        return REGISTRY["gpu"][job][DEFAULTS["gpu"][job]](settings, cache, "")
    return impls[DEFAULTS[profile][job]](settings, cache, "")


def _checked(adapters: dict[str, ModelAdapter], check: bool) -> dict[str, ModelAdapter]:
    if check:
        for adapter in adapters.values():
            adapter.check()
    return adapters


def build_vision_models(settings: Settings, cache: ModelCache | None = None, check: bool = True) -> VisionModels:
    """The vision stage's adapters, each ``check()``-ed (a wrong path raises
    ModelConfigError naming the setting); nothing is loaded. Sets
    PYTORCH_CUDA_ALLOC_CONF (``models.cuda_alloc_conf``) first, before torch may start CUDA."""
    configure_cuda_allocator(settings.models.cuda_alloc_conf)
    cache = cache if cache is not None else get_model_cache(settings)
    a = _checked({job: build_adapter(settings, job, cache) for job in VISION_JOBS}, check)
    describer, reader, image_embedder, text_embedder, word_vectorizer = (a[job] for job in VISION_JOBS)
    # each job's factories make adapters of its contract
    assert isinstance(describer, Describer) and isinstance(reader, TextReader) and isinstance(image_embedder, ImageEmbedder)
    assert isinstance(text_embedder, TextEmbedder) and isinstance(word_vectorizer, WordVectorizer)
    return VisionModels(describer, reader, image_embedder, text_embedder, word_vectorizer)


def build_enrich_models(settings: Settings, cache: ModelCache | None = None, check: bool = True) -> EnrichModels:
    cache = cache if cache is not None else get_model_cache(settings)
    a = _checked({"structure_text": build_adapter(settings, "structure_text", cache)}, check)
    structurer = a["structure_text"]
    assert isinstance(structurer, TextStructurer)  # its factories make structurers
    return EnrichModels(structurer)


def warm_up(models: VisionModels | EnrichModels, settings: Settings) -> threading.Thread:
    """Load a stage's models in a background thread, so that loading overlaps the rest of the
    stage's start (imports, the consumer group join: seconds on tansu) and the first batch
    finds them loaded; the cache loads each once however many threads ask. At most
    ``models.cache_size`` adapters (an adapter may hold two entries: size the cache for the
    stage, as its batches need anyway). A failure is left for the
    first batch, which raises it through the stage's normal error handling."""
    adapters = list(dict.fromkeys(getattr(models, f.name) for f in fields(models)))

    def load_all() -> None:
        for adapter in adapters[: settings.models.cache_size]:
            try:
                adapter.load()
            except Exception as exc:  # reported by the first batch that needs it
                logging.getLogger(__name__).debug("warm-up of %s failed: %s", adapter, exc)

    # Not a daemon: a stop that comes while a model loads must wait for the load to end, since
    # the interpreter tearing down under a thread inside llama.cpp or torch kills the process
    # with SIGSEGV (seen in the chaos test: SIGTERM a second after an enrich restart). A load
    # takes seconds; the supervisor waits 60 s before it kills.
    thread = threading.Thread(target=load_all, name="model-warm-up", daemon=False)
    thread.start()
    return thread


def _configured(settings: Settings, job: str) -> str:
    override = getattr(settings.models, JOBS[job])
    source = PRODUCTION_SOURCES.get(job)
    return override or (source and getattr(settings.models, source)) or "(profile default)"


def check_models(settings: Settings, load: bool = False) -> list[tuple[str, str, bool, str]]:
    """(job, "model_id <- where it loads from" or the configured value, ok, message) per
    job. Checks that each configured path exists and looks valid (config / weights files,
    file magic) without loading; ``load=True`` also loads each model once.
    (model_id may hash weight files once.)"""
    rows = []
    cache = ModelCache(1)  # one model at a time when load=True
    for job in JOBS:
        configured = _configured(settings, job)
        try:
            adapter = build_adapter(settings, job, cache)
            adapter.check()
            if load:
                adapter.load()
            where = adapter.model_id + (f" <- {adapter.source}" if adapter.source else "")
            rows.append((job, where, True, "loaded" if load else "ok"))
        except ModelConfigError as e:
            rows.append((job, configured, False, str(e)))
        except Exception as e:  # an unexpected failure is a failed check, not a crash
            rows.append((job, configured, False, f"{type(e).__name__}: {e}"))
    cache.clear()
    return rows


# -- the embedded (CPU) profile ----------------------------------------------------------


def _no_spec(job: str, spec: str) -> None:
    if spec:
        known = sorted(REGISTRY["embedded"][job])
        raise ModelConfigError(f"{setting_name(job)} = {spec!r}: not an implementation of the embedded profile (known: {known}; empty for the default)")


def _efficientnet_classifier(settings: Settings, cache: ModelCache):
    from imgflow.models.embedded.efficientnet import EfficientNetClassifier

    return EfficientNetClassifier(cache, device=settings.models.device)


def _face_detector(settings: Settings, cache: ModelCache):
    """MTCNN (``models.faces``, ``face_min_score``, ``face_min_height``); None when off."""
    from imgflow.models.embedded.faces import MtcnnFaceDetector

    m = settings.models
    if not m.faces:
        return None
    return MtcnnFaceDetector(cache, device=m.device, min_score=m.face_min_score, min_height=m.face_min_height)


def _composed(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.describe import ComposedDescriber

    _no_spec("describe", spec)
    return ComposedDescriber(_efficientnet_classifier(settings, cache), _face_detector(settings, cache))


def _rapidocr(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.ocr import RapidOcrReader

    _no_spec("read_text", spec)
    return RapidOcrReader(cache)


def _efficientnet_embedder(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.efficientnet import EfficientNetImageEmbedder

    _no_spec("embed_image", spec)
    return EfficientNetImageEmbedder(cache, device=settings.models.device)


def _minilm(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.minilm import MiniLmTextEmbedder

    _no_spec("embed_text", spec)
    return MiniLmTextEmbedder(cache, device=settings.models.device)


def _glove(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.glove import GloveWordVectorizer

    _no_spec("word_vectors", spec)
    return GloveWordVectorizer(cache)


def _llm_options(m: ModelSettings) -> LlmOptions:
    """The ``models.llm_*`` settings, as both profiles' LLM adapters take them."""
    return {
        "n_ctx": m.llm_ctx,
        "n_threads": m.llm_threads,
        "max_tokens": m.llm_max_tokens,
        "device": m.llm_device,
        "n_parallel": m.llm_batch,
        "description": m.llm_description,
    }


def _llama_cpp(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.llm.embedded import LlamaCppStructurer

    return LlamaCppStructurer(cache, spec, settings.models.models_dir, **_llm_options(settings.models))


register("embedded", "describe", "composed", _composed, default=True)
register("embedded", "read_text", "rapidocr", _rapidocr, default=True)
register("embedded", "embed_image", "efficientnet-lite0", _efficientnet_embedder, default=True)
register("embedded", "embed_text", "all-minilm-l6-v2", _minilm, default=True)
register("embedded", "word_vectors", "glove-6b-50d", _glove, default=True)
# "qwen2.5-coder-0.5b" / "smollm2-135m" / a .gguf path are all specs of one factory.
register("embedded", "structure_text", "llama-cpp", _llama_cpp, default=True)


# -- the production (GPU) profile: models from paths the user configures -------------------
# Each factory reads its source setting when spec is "" (see PRODUCTION_SOURCES).


def _qwen2vl(kind: str):
    def factory(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
        from imgflow.models.gpu import vlm

        m = settings.models
        cls = vlm.Qwen2VlDescriber if kind == "describe" else vlm.Qwen2VlTextReader
        max_new = m.vlm_max_new_tokens if kind == "describe" else m.vlm_text_max_new_tokens
        return cls(cache, spec or m.vlm, device=m.device, dtype=m.vlm_dtype, attn_implementation=m.vlm_attn_implementation, max_new_tokens=max_new)

    return factory


def _open_clip(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.gpu.clip import OpenClipImageEmbedder

    return OpenClipImageEmbedder(cache, spec or settings.models.clip, device=settings.models.device)


def _sentence(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.gpu.sentence import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(cache, spec or settings.models.sentence, device=settings.models.device)


def _gensim(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.gpu.word_vectors import GensimWordVectorizer

    return GensimWordVectorizer(cache, spec or settings.models.word_vectors)


def _gguf(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.llm.production import GgufStructurer
    from imgflow.models.llm.shipped import QWEN_NAME, SMOLLM2_NAME

    m = settings.models
    if (spec or m.llm).strip() in (QWEN_NAME, SMOLLM2_NAME):  # a shipped GGUF, by name
        return _llama_cpp(settings, cache, (spec or m.llm).strip())
    return GgufStructurer(cache, spec or m.llm, **_llm_options(m))


register("gpu", "describe", "qwen2-vl", _qwen2vl("describe"), default=True)
register("gpu", "read_text", "qwen2-vl", _qwen2vl("read_text"), default=True)
register("gpu", "embed_image", "open-clip", _open_clip, default=True)
register("gpu", "embed_text", "sentence-transformers", _sentence, default=True)
register("gpu", "word_vectors", "gensim", _gensim, default=True)
register("gpu", "structure_text", "gguf", _gguf, default=True)
