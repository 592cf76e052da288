"""Enrich stage alone: the batched engine at 1, 4, 8, 16 sequences against today's per-image
path, on the same model, the same enrich inputs, in one run.

    .venv/bin/python -m benchmarks.enrich_batch [--images 16] [--llm qwen2.5-coder-0.5b] [--threads 1]

The inputs are the real vision stage's outputs for a mixed set of photos and rendered-text
images (computed first, not timed). Variants, run one after the other in an interleaved
order (wide, narrow, ...) so that load from other processes hits them alike:

- ``today``: what the enrich stage did before the batched engine: one
  ``create_chat_completion`` per image with the schema and prompt of that time (it also
  generated ``image_text``; frozen below from commit f370c01), the grammar applied to the
  whole vocabulary at every token;
- ``per-image``: the same per-image call with the request the enrich stage makes now (the
  facts as notes, a per-image grammar: keywords, the category only when there is a choice,
  a caption only when ``--description`` / the model says so);
- ``batch N, today's request``: the batched engine on the old request (the engine's gain
  alone, without the shorter answers);
- ``batch N``: ``imgflow.models.llm.engine.BatchGenerator`` with N sequences on the current
  request, as the enrich stage runs it (shared prefix, slot refill, greedy grammar check).

Per variant: images/s (wall), CPU seconds per image (this process; robust to other load when
threads = 1), prompt and answer tokens per image, valid answers, and for batch 1 how many
answers are identical to ``per-image``'s. Prints a table; JSON in benchmarks/results/enrich_batch.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import mixed_images, print_table, vision_values, write_result

# The enrich request as it was before issue 10/11 (commit f370c01), for the ``today`` variant.
TODAY_SCHEMA = {
    "type": "object",
    "properties": {
        "description": {"type": "string", "minLength": 1, "maxLength": 300},
        "category": {"type": "string", "minLength": 1, "maxLength": 30},
        "keywords": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 3, "maxItems": 8},
        "image_text": {"type": "string", "maxLength": 300},
    },
    "required": ["description", "category", "keywords", "image_text"],
    "additionalProperties": False,
}
TODAY_SYSTEM = (
    "You turn notes about an image into a JSON object with the keys "
    '"description", "category", "keywords" and "image_text".\n'
    "description: one short sentence in your own words saying what the image shows "
    "(no percentages).\n"
    "category: one or two words, a general class such as animal, food, drink, vehicle, "
    "person, document, sign, building, plant, object.\n"
    "keywords: 3 to 8 short keywords from the notes.\n"
    'image_text: copy the text read in the image exactly; "" if none.\n'
    "Use only the facts in the notes; do not invent anything."
)


def today_prompt(item) -> str:
    lines = [f"Description: {item.description.strip() or '(none)'}"]
    if item.labels:
        lines.append("Labels (best first): " + ", ".join(item.labels))
    text = item.image_text.strip()
    lines.append(f"Text read in the image: {json.dumps(text, ensure_ascii=False)}" if text else 'Text read in the image: "" (none)')
    return "\n".join(lines)


def structure_inputs(values: list[dict]):
    from imgflow.models.base import StructureInput

    return [
        StructureInput(
            description=v["text"], image_text=v["image_text"], labels=[lab["label"] for lab in v["labels"]], scores=[lab["score"] for lab in v["labels"]]
        )
        for v in values
    ]


def run_per_image(llm, grammar_of, items, messages_of, max_tokens: int) -> dict:
    from imgflow.models.llm.structurer import SEED

    texts, tin, tout = [], 0, 0
    for item in items:
        resp = llm.create_chat_completion(messages=messages_of(item), grammar=grammar_of(item), temperature=0.0, top_k=1, seed=SEED, max_tokens=max_tokens)
        texts.append(resp["choices"][0]["message"]["content"] or "")
        tin += resp["usage"]["prompt_tokens"]
        tout += resp["usage"]["completion_tokens"]
    return {"texts": texts, "prompt_tokens": tin, "completion_tokens": tout}


def run_engine(llm, grammar_of, items, messages_of, prefix, n_parallel: int, n_ctx: int, threads: int, max_tokens: int) -> dict:
    from dataclasses import replace

    from imgflow.models.llm.chat import render_chat
    from imgflow.models.llm.engine import BatchGenerator

    gen = BatchGenerator(llm, grammar_of(items[0]), n_parallel, n_ctx, threads, threads, prefix=prefix)
    try:
        prompts = [replace(render_chat(llm, messages_of(it)), grammar=grammar_of(it)) for it in items]
        out = gen.generate(prompts, max_tokens)
        full = gen.full_grammar_passes
    finally:
        gen.close()
    texts = [g.text if not isinstance(g, Exception) else "" for g in out]
    ok = [g for g in out if not isinstance(g, Exception)]
    return {
        "texts": texts,
        "prompt_tokens": sum(g.prompt_tokens for g in ok),
        "completion_tokens": sum(g.completion_tokens for g in ok),
        "full_grammar_passes": full,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images (half photos, half text), default 16")
    ap.add_argument("--llm", default="", help="models.llm: '' (Qwen2.5-Coder-0.5B), smollm2-135m or a .gguf path")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for every variant (default 1)")
    ap.add_argument("--batches", default="1,4,8,16", help="engine sequence counts, default 1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence (models.llm_ctx)")
    ap.add_argument("--skip-today", action="store_true", help="leave out the two per-image variants")
    ap.add_argument(
        "--description",
        default="auto",
        choices=["auto", "llm", "facts"],
        help="models.llm_description for the current request (default auto: as the enrich stage)",
    )
    args = ap.parse_args(argv)

    from llama_cpp import Llama, LlamaGrammar

    from imgflow.models.llm.answer import validate
    from imgflow.models.llm.chat import common_prefix, render_chat
    from imgflow.models.llm.embedded import LlamaCppStructurer
    from imgflow.models.llm.prompt import Grammars, messages
    from imgflow.models.llm.shipped import ensure_qwen_gguf, resolve_llm
    from imgflow.models.llm.structurer import SEED
    from imgflow.settings import Settings, default_models_dir

    spec = resolve_llm(args.llm, default_models_dir())
    path = ensure_qwen_gguf(spec.path.parent) if spec.joined else spec.path
    with tempfile.TemporaryDirectory() as tmp:
        print(f"vision stage on {args.images} images (not timed) ...", flush=True)
        values = vision_values(mixed_images(Path(tmp) / "images", args.images), Settings())
    items = structure_inputs(values)

    llm = Llama(model_path=str(path), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads, seed=SEED, verbose=False)
    today_grammar = LlamaGrammar.from_json_schema(json.dumps(TODAY_SCHEMA), verbose=False)
    # The request the enrich stage makes now (as LlamaCppStructurer builds it for this model).
    describe = LlamaCppStructurer(None, args.llm, default_models_dir(), description=args.description).writes_description
    grammars = Grammars(describe)

    def today_messages(item):
        return [{"role": "system", "content": TODAY_SYSTEM}, {"role": "user", "content": today_prompt(item)}]

    def current_messages(item):
        return messages(LlamaCppStructurer.prompt(item), describe)

    def prefix_of(messages_of) -> list[int]:
        from imgflow.models.base import StructureInput

        a, b = (render_chat(llm, messages_of(StructureInput(x, "", [], []))).tokens for x in ("a", "b"))
        return a[: common_prefix(a, b)]

    prefix, today_prefix = prefix_of(current_messages), prefix_of(today_messages)
    variants: dict[str, callable] = {}
    if not args.skip_today:
        variants["today"] = lambda: run_per_image(llm, lambda _: today_grammar, items, today_messages, args.max_tokens)
        variants["per-image"] = lambda: run_per_image(llm, grammars.for_item, items, current_messages, args.max_tokens)
    top = max(int(x) for x in args.batches.split(",") if x)
    variants[f"batch {top}, today's request"] = lambda: run_engine(
        llm, lambda _: today_grammar, items, today_messages, today_prefix, top, args.ctx, args.threads, args.max_tokens
    )
    for n in [int(x) for x in args.batches.split(",") if x]:
        variants[f"batch {n}"] = lambda n=n: run_engine(llm, grammars.for_item, items, current_messages, prefix, n, args.ctx, args.threads, args.max_tokens)
    names = list(variants)
    order = [names[i // 2] if i % 2 == 0 else names[-1 - i // 2] for i in range(len(names))]
    order = list(dict.fromkeys(order))  # interleave wide and narrow: today, batch 16, per-image, batch 8, ...
    results = {}
    for name in order:
        print(f"running {name} ...", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        r = variants[name]()
        r["wall_s"], r["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
        valid = 0
        for item, text in zip(items, r["texts"]):
            try:
                if "today" in name:
                    json.loads(text)
                else:
                    validate(text, item, describe=describe)
                valid += 1
            except Exception:
                pass
        r["valid"] = valid
        results[name] = r
        print(f"  {name}: {len(items) / r['wall_s']:.3f} images/s, {r['cpu_s'] / len(items):.2f} CPU s/image", flush=True)
    llm.close()

    n = len(items)
    base = results.get("today")
    rows, out = [], {}
    for name in names:
        r = results[name]
        same = None
        if name == "batch 1" and "per-image" in results:
            same = sum(x == y for x, y in zip(r["texts"], results["per-image"]["texts"]))
        fig = {
            "images_per_s": n / r["wall_s"],
            "cpu_s_per_image": r["cpu_s"] / n,
            "prompt_tokens_per_image": r["prompt_tokens"] / n,
            "answer_tokens_per_image": r["completion_tokens"] / n,
            "valid": r["valid"],
            "identical_to_per_image": same,
            "speedup_wall_vs_today": (base["wall_s"] / r["wall_s"]) if base else None,
            "speedup_cpu_vs_today": (base["cpu_s"] / r["cpu_s"]) if base else None,
            "full_grammar_passes": r.get("full_grammar_passes"),
        }
        out[name] = fig
        rows.append(
            [
                name,
                fig["images_per_s"],
                fig["cpu_s_per_image"],
                "-" if base is None else f"{fig['speedup_wall_vs_today']:.2f}x",
                "-" if base is None else f"{fig['speedup_cpu_vs_today']:.2f}x",
                round(fig["prompt_tokens_per_image"]),
                round(fig["answer_tokens_per_image"], 1),
                f"{r['valid']}/{n}",
                "-" if same is None else f"{same}/{n}",
            ]
        )
    print_table(
        f"enrich alone: {n} images, model {spec.name}, {args.threads} thread(s)",
        ["variant", "images/s", "CPU s/img", "vs today", "vs today (CPU)", "prompt tok", "answer tok", "valid", "same as per-image"],
        rows,
    )
    write_result(
        "enrich_batch",
        {
            "images": n,
            "model": spec.name,
            "threads": args.threads,
            "writes_description": describe,
            "order": order,
            "variants": out,
            "texts": {k: v["texts"] for k, v in results.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
