"""The LLM's answer checked and turned into the structured record."""

from __future__ import annotations

import json

from imgflow.models.base import StructureInput
from imgflow.models.llm import grounding


class StructuringError(RuntimeError):
    """The model's answer could not be turned into a valid structured record."""


def validate(raw: str, item: StructureInput, truncated: bool = False, describe: bool = True) -> dict:
    """Parse and check one answer, then apply the grounding rules (``imgflow.models.llm.grounding``)."""
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
