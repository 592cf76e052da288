"""Pick model implementations by ``settings.models.profile`` and the per-job overrides.

``REGISTRY[profile][job]`` maps an implementation name to a factory
``factory(settings, cache, spec) -> adapter``; ``DEFAULTS[profile][job]`` names the one used
when the job's override setting is empty. An override (``models.<setting>``) that is a
registered name picks that implementation (``spec`` = ""); any other value is handed to the
profile's default factory as ``spec`` (e.g. a path to a .gguf for ``models.llm``), and a
factory that takes no spec raises ModelConfigError naming the setting.

To add a profile: ``register("gpu", "describe", "qwen2-vl", factory, default=True)`` for
each job (see ``JOBS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
from imgflow.settings import Settings

# job name (ModelAdapter.job) -> the ModelSettings field that overrides it
JOBS: dict[str, str] = {
    "describe": "describe",
    "read_text": "read_text",
    "embed_image": "embed_image",
    "embed_text": "embed_text",
    "word_vectors": "word_vectors",
    "structure_text": "llm",
}
VISION_JOBS = ("describe", "read_text", "embed_image", "embed_text", "word_vectors")
ENRICH_JOBS = ("structure_text",)

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
        raise ModelConfigError(
            f"profile {profile!r} (models.profile / IMGFLOW_MODELS__PROFILE) is not "
            f"implemented yet; available: {sorted(REGISTRY)}"
        )
    impls = REGISTRY[profile].get(job)
    if not impls:
        raise ModelConfigError(f"profile {profile!r} has no implementation for job {job!r}")
    cache = cache if cache is not None else get_model_cache(settings)
    override = getattr(settings.models, JOBS[job]).strip()
    if override in impls:
        return impls[override](settings, cache, "")
    return impls[DEFAULTS[profile][job]](settings, cache, override)


def build_vision_models(settings: Settings, cache: ModelCache | None = None) -> VisionModels:
    cache = cache if cache is not None else get_model_cache(settings)
    a = {job: build_adapter(settings, job, cache) for job in VISION_JOBS}
    return VisionModels(
        describer=a["describe"],
        reader=a["read_text"],
        image_embedder=a["embed_image"],
        text_embedder=a["embed_text"],
        word_vectorizer=a["word_vectors"],
    )


def build_enrich_models(settings: Settings, cache: ModelCache | None = None) -> EnrichModels:
    cache = cache if cache is not None else get_model_cache(settings)
    return EnrichModels(structurer=build_adapter(settings, "structure_text", cache))


def check_models(settings: Settings) -> list[tuple[str, str, bool, str]]:
    """(job, model_id or the configured value, ok, message) per job; loads nothing
    (model_id may hash weight files once)."""
    rows = []
    cache = ModelCache(1)  # never used for loading here
    for job in JOBS:
        configured = getattr(settings.models, JOBS[job]) or "(profile default)"
        try:
            adapter = build_adapter(settings, job, cache)
            adapter.check()
            rows.append((job, adapter.model_id, True, "ok"))
        except ModelConfigError as e:
            rows.append((job, configured, False, str(e)))
        except Exception as e:  # an unexpected failure is a failed check, not a crash
            rows.append((job, configured, False, f"{type(e).__name__}: {e}"))
    return rows


# -- the embedded (CPU) profile ----------------------------------------------------------


def _no_spec(job: str, spec: str) -> None:
    if spec:
        known = sorted(REGISTRY["embedded"][job])
        raise ModelConfigError(
            f"{setting_name(job)} = {spec!r}: not an implementation of the embedded profile "
            f"(known: {known}; empty for the default)"
        )


def _efficientnet_classifier(settings: Settings, cache: ModelCache):
    from imgflow.models.embedded.efficientnet import EfficientNetClassifier

    return EfficientNetClassifier(cache, device=settings.models.device)


def _composed(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.describe import ComposedDescriber

    _no_spec("describe", spec)
    return ComposedDescriber(_efficientnet_classifier(settings, cache))


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


def _llama_cpp(settings: Settings, cache: ModelCache, spec: str) -> ModelAdapter:
    from imgflow.models.embedded.llm import LlamaCppStructurer

    m = settings.models
    return LlamaCppStructurer(cache, spec, m.models_dir, n_ctx=m.llm_ctx, n_threads=m.llm_threads,
                              max_tokens=m.llm_max_tokens, device=m.device)


register("embedded", "describe", "composed", _composed, default=True)
register("embedded", "read_text", "rapidocr", _rapidocr, default=True)
register("embedded", "embed_image", "efficientnet-lite0", _efficientnet_embedder, default=True)
register("embedded", "embed_text", "all-minilm-l6-v2", _minilm, default=True)
register("embedded", "word_vectors", "glove-6b-50d", _glove, default=True)
# "qwen2.5-coder-0.5b" / "smollm2-135m" / a .gguf path are all specs of one factory.
register("embedded", "structure_text", "llama-cpp", _llama_cpp, default=True)
