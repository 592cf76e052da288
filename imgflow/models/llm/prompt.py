"""What the structuring LLM is asked, and the grammar its answer must follow.

Generation is constrained by a grammar built from a JSON schema per image
(``generation_schema``: a caption of at most DESCRIPTION_MAX_CHARS, 2-4 keywords, no extra
keys, and a category as an enum of the image's candidate categories only when there are
several), so the output always parses unless it is cut off. ``image_text`` is not
generated: it is the OCR text. Fewer generated tokens is most of the enrich stage's speed: it
decodes ~16-25 tokens per image, not the ~45 of a full record.
"""

from __future__ import annotations

import json
from typing import Any

from imgflow.models.base import StructureInput
from imgflow.models.categories import CATEGORY_NAMES
from imgflow.models.llm import grounding

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
        # (llm.sampler) the whole-vocabulary pass is rare, so it costs little now.
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
        self._compiled: dict[tuple[str, ...], Any] = {}

    def for_candidates(self, cands: list[str]) -> Any:
        from llama_cpp import LlamaGrammar

        key = tuple(cands) if len(cands) > 1 else ()
        if key not in self._compiled:
            self._compiled[key] = LlamaGrammar.from_json_schema(json.dumps(generation_schema(list(key), self.describe)), verbose=False)
        return self._compiled[key]

    def for_item(self, item: StructureInput) -> Any:
        return self.for_candidates(grounding.facts(item).candidates)
