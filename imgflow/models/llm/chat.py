"""Prompts as llama.cpp tokens: what ``Llama.create_chat_completion`` would feed the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stop: tuple[str, ...] = ()  # stop strings from the chat template (e.g. "<|im_end|>")
    grammar: object = None  # this item's LlamaGrammar; None: the generator's own


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of generation / stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class _CapturedCompletion(Exception):
    pass


class _RenderProxy:
    """Stands in for the ``Llama`` inside its chat handler: everything is delegated except
    ``create_completion``, which records the prompt tokens and stop strings and stops."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.captured: dict = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> None:
        self.captured = kwargs
        raise _CapturedCompletion


def render_chat(llm: Any, messages: list[dict]) -> Prompt:
    """The prompt tokens and stop strings ``llm.create_chat_completion(messages)`` would use."""
    from llama_cpp import llama_chat_format

    handler = llm.chat_handler or llm._chat_handlers.get(llm.chat_format) or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    proxy = _RenderProxy(llm)
    try:
        handler(llama=proxy, messages=messages)
    except _CapturedCompletion:
        pass
    tokens = proxy.captured.get("prompt")
    if not isinstance(tokens, list):
        raise RuntimeError(f"chat format {llm.chat_format!r} did not render a token prompt")
    stop = proxy.captured.get("stop") or []
    return Prompt(list(tokens), tuple([stop] if isinstance(stop, str) else stop))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
