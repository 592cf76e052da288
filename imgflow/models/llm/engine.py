"""Greedy, grammar-constrained generation for many prompts at once with llama.cpp.

llama-cpp-python's ``Llama`` decodes one sequence at a time; this drives llama.cpp's
low-level API directly so that one ``llama_decode`` call advances every active sequence:

- one context of parallel slots plus a sequence holding the prompt prefix every prompt shares,
  copied into a slot when an item starts there, so only the item's own part of the prompt is
  evaluated (``context.SequenceContext``);
- one ``llama_batch`` per step holding each decoding slot's next token, plus the prompts of
  items that just took a free slot (a finished item's slot is refilled at once);
- one grammar sampler per slot (an item may bring its own grammar: ``Prompt.grammar``),
  greedy with the argmax token checked first (``sampler.GrammarSampler``);
- the prompt is rendered by the ``Llama``'s own chat handler (``chat.render_chat``) and the
  text is detokenised, cut at stop strings and limited to ``max_tokens`` as
  ``create_chat_completion`` does.

With one slot the output is the same as ``create_chat_completion`` with ``temperature=0``;
with several, llama.cpp's CPU kernels may round differently for a different batch shape, so
the text can differ (llama.cpp documents this): tests that compare exact text use one slot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from imgflow.models.llm.chat import Generation, Prompt
from imgflow.models.llm.context import SequenceContext
from imgflow.models.llm.sampler import Candidates, GrammarSampler

# The empty prompt a free slot holds (so a slot's prompt is never None).
_NO_PROMPT = Prompt([])


@dataclass
class _Slot:
    seq: int
    sampler: GrammarSampler  # this slot's grammar
    index: int = -1  # which item (position in the call's list); -1: free
    prompt: Prompt = _NO_PROMPT
    n_past: int = 0  # tokens of this item already in the KV cache
    max_tokens: int = 0
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    pending: int | None = None  # sampled, to be decoded in the next step
    logit_row: int = -1  # row of this slot's logits in the last decode


class BatchGenerator:
    """Greedy generation under one grammar, ``n_parallel`` sequences per ``llama_decode``.

    Not thread-safe: callers serialise (one per loaded model). ``close()`` frees the context
    and samplers; the ``Llama`` (model weights, tokenizer) stays the caller's."""

    def __init__(
        self,
        llm: Any,
        grammar: Any,
        n_parallel: int,
        n_ctx_seq: int,
        n_threads: int,
        n_threads_batch: int,
        n_batch: int = 2048,
        prefix: list[int] | None = None,
        max_threads: int = 0,
    ) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.llm = llm
        self.grammar = grammar
        self.n_parallel = max(1, int(n_parallel))
        self.context = SequenceContext(lc, llm, self.n_parallel, n_ctx_seq, n_threads, n_threads_batch, n_batch, max_threads)
        self.n_ctx_seq = self.context.n_ctx_seq
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.candidates = Candidates(lc, self.n_vocab)
        self.slots = [_Slot(seq=s, sampler=GrammarSampler(lc, self.vocab, self.candidates)) for s in range(self.n_parallel)]
        try:
            for slot in self.slots:
                slot.sampler.use(grammar)
        except RuntimeError:
            self.close()
            raise
        if prefix:
            self.context.set_prefix(prefix)

    @property
    def full_grammar_passes(self) -> int:
        """How often the argmax token was rejected (for benchmarks)."""
        return self.candidates.full_grammar_passes

    def generate(self, prompts: list[Prompt], max_tokens: int) -> list[Generation | Exception]:
        """One Generation per prompt, in order; a prompt that does not fit gets a ValueError
        (the others still run). Raises only when llama.cpp itself fails (the whole call)."""
        results: list[Generation | Exception | None] = [None] * len(prompts)
        queue: deque[int] = deque()
        for i, p in enumerate(prompts):
            if len(p.tokens) >= self.n_ctx_seq:
                results[i] = ValueError(f"prompt of {len(p.tokens)} tokens does not fit the context of {self.n_ctx_seq} tokens per sequence (models.llm_ctx)")
            elif not p.tokens:
                results[i] = ValueError("empty prompt")
            else:
                queue.append(i)
        try:
            while True:
                for slot in self.slots:
                    if slot.index < 0 and queue:
                        i = queue.popleft()
                        self._start(slot, i, prompts[i], max_tokens)
                active = [s for s in self.slots if s.index >= 0]
                if not active:
                    break
                self._step(active)
                for slot in active:
                    if slot.logit_row >= 0:
                        done = self._sample(slot)
                        if done is not None:
                            results[slot.index] = done
                            self._free(slot)
        finally:
            for slot in self.slots:
                if slot.index >= 0:
                    self._free(slot)
        finished = [r for r in results if r is not None]
        assert len(finished) == len(results)  # every queued item ran to its end
        return finished

    def _start(self, slot: _Slot, index: int, prompt: Prompt, max_tokens: int) -> None:
        slot.index, slot.prompt, slot.out, slot.text, slot.pending = index, prompt, [], b"", None
        n = len(prompt.tokens)
        # as create_completion: never past the context
        slot.max_tokens = max_tokens if max_tokens + n < self.n_ctx_seq else self.n_ctx_seq - n
        slot.sampler.use(prompt.grammar or self.grammar)
        slot.n_past = self.context.start(slot.seq, prompt.tokens)

    def _free(self, slot: _Slot) -> None:
        slot.index, slot.prompt, slot.pending, slot.logit_row = -1, _NO_PROMPT, None, -1
        self.context.forget(slot.seq)

    def _step(self, active: list[_Slot]) -> None:
        """One llama_decode: every decoding slot's pending token, then as much prompt as fits."""
        ctx = self.context
        ctx.clear_batch()
        budget = ctx.n_batch
        for slot in active:
            slot.logit_row = -1
            if slot.pending is not None:
                slot.logit_row = ctx.add(slot.pending, slot.n_past, slot.seq, True)
                slot.n_past += 1
                slot.pending = None
                budget -= 1
        for slot in active:
            tokens = slot.prompt.tokens
            if slot.logit_row >= 0 or slot.n_past >= len(tokens) or budget <= 0:
                continue
            take = min(budget, len(tokens) - slot.n_past)
            row = -1
            for pos in range(slot.n_past, slot.n_past + take):
                row = ctx.add(tokens[pos], pos, slot.seq, pos == len(tokens) - 1)
            if slot.n_past + take == len(tokens):
                slot.logit_row = row
            slot.n_past += take
            budget -= take
        ctx.decode()

    def _sample(self, slot: _Slot) -> Generation | None:
        """Pick the slot's next token; a Generation when the item is finished."""
        token = slot.sampler.pick(self.context.logits(slot.logit_row, self.n_vocab))
        if token is None:
            return self._finish(slot, "stop")  # the grammar allows nothing more
        if self.lc.llama_vocab_is_eog(self.vocab, token):
            return self._finish(slot, "stop")
        slot.out.append(token)
        piece = self.llm.detokenize([token])
        slot.text += piece
        if slot.prompt.stop:
            tail = slot.text[-(len(piece) + max(len(s.encode()) for s in slot.prompt.stop)) :]
            if any(s.encode() in tail for s in slot.prompt.stop):
                return self._finish(slot, "stop")
        if len(slot.out) >= slot.max_tokens:
            return self._finish(slot, "length")
        slot.pending = token
        return None

    def _finish(self, slot: _Slot, reason: str) -> Generation:
        text = self.llm.detokenize(slot.out)
        for s in slot.prompt.stop:  # as create_completion: cut at the first stop string found
            at = text.find(s.encode())
            if at >= 0:
                text = text[:at]
                break
        return Generation(text.decode("utf-8", errors="ignore"), reason, len(slot.prompt.tokens), len(slot.out))

    def close(self) -> None:
        for slot in getattr(self, "slots", []):
            slot.sampler.close()
        context = getattr(self, "context", None)
        if context is not None:
            context.close()
