"""Greedy, grammar-constrained generation for many prompts at once with llama.cpp.

llama-cpp-python's ``Llama`` decodes one sequence at a time; this drives llama.cpp's
low-level API directly so that one ``llama_decode`` call advances every active sequence:

- one context beside the ``Llama``'s, its parameters copied from the ``Llama`` (flash
  attention off as ``Llama`` sets it: llama.cpp's own default turns it on and changes
  outputs), with ``n_seq_max`` = parallel slots + 1 and ``kv_unified = False`` (a unified
  KV cache changed outputs); each slot has ``n_ctx_seq`` cells of its own;
- the prompt prefix every prompt shares (chat template + system prompt) is evaluated once
  into the extra sequence and copied into a slot (``llama_memory_seq_cp``) when an item
  starts there, so only the item's own part of the prompt is evaluated;
- one ``llama_batch`` per step holding each decoding slot's next token, plus the prompts of
  items that just took a free slot (a finished item's slot is refilled at once);
- one grammar sampler per slot (an item may bring its own grammar: ``Prompt.grammar``);
  greedy sampling checks the argmax token against the grammar
  first and only applies the grammar to the whole vocabulary when it is rejected (what
  llama.cpp's own sampler does; the chosen token is the same as a full pass's);
- the prompt is rendered by the ``Llama``'s own chat handler and the text is detokenised,
  cut at stop strings and limited to ``max_tokens`` as ``create_chat_completion`` does.

With one slot the output is the same as ``create_chat_completion`` with ``temperature=0``;
with several, llama.cpp's CPU kernels may round differently for a different batch shape, so
the text can differ (llama.cpp documents this): tests that compare exact text use one slot.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


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

    def __init__(self, llm) -> None:
        self._llm = llm
        self.captured: dict = {}

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_completion(self, **kwargs):
        self.captured = kwargs
        raise _CapturedCompletion


def render_chat(llm, messages: list[dict]) -> Prompt:
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


@dataclass
class _Slot:
    seq: int
    sampler: object  # llama_sampler_p: this slot's grammar
    grammar: object = None  # the LlamaGrammar the sampler was made from
    index: int = -1  # which item (position in the call's list); -1: free
    prompt: Prompt | None = None
    n_past: int = 0  # tokens of this item already in the KV cache
    max_tokens: int = 0
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    pending: int | None = None  # sampled, to be decoded in the next step
    logit_row: int = -1  # row of this slot's logits in the last decode


class IdleCores:
    """How many of this machine's cores other processes left idle, measured between calls
    from /proc/stat (all processes' busy time) minus this process's own CPU time.

    On a machine shared with the vision stage the LLM takes half the cores; when the other
    stages wait (the pipeline's start and tail, a backlog only the LLM has), it may take
    them all. llama.cpp's threads spin while they wait, so taking a busy core is far worse
    than leaving an idle one: any other process using more than ``busy`` of a core gives
    it back at the next check (a fair share of a contended core is ~0.5 of it)."""

    def __init__(self, interval_s: float = 0.5, busy: float = 0.3) -> None:
        self._clock = time.monotonic
        self.interval_s, self.busy = interval_s, busy
        self.cores = len(os.sched_getaffinity(0))
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last = self._sample()
        self.others = float(self.cores)  # until measured: assume busy

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self._tick  # all but idle, iowait
        t = os.times()
        return self._clock(), busy, t.user + t.system

    def others_busy(self) -> float:
        """Cores' worth of CPU the other processes used over the last interval (re-measured
        at most every ``interval_s``)."""
        now = self._sample()
        if now is None or self._last is None:
            return float(self.cores)
        if now[0] - self._last[0] >= self.interval_s:
            wall = now[0] - self._last[0]
            self.others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
            self._last = now
        return self.others

    def threads(self, base: int, most: int) -> int:
        """``base`` threads, or up to ``most`` while the other cores stay idle."""
        if most <= base:
            return base
        free = self.cores - self.others_busy()
        return max(base, min(most, int(free + 0.5))) if self.others <= self.busy else base


class BatchGenerator:
    """Greedy generation under one grammar, ``n_parallel`` sequences per ``llama_decode``.

    Not thread-safe: callers serialise (one per loaded model). ``close()`` frees the context
    and samplers; the ``Llama`` (model weights, tokenizer) stays the caller's."""

    def __init__(
        self,
        llm,
        grammar,
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
        self.n_parallel = max(1, int(n_parallel))
        self.prefix_seq = self.n_parallel  # the extra sequence holding the shared prefix
        params = lc.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = self.n_parallel + 1
        params.kv_unified = False
        params.n_ctx = n_ctx_seq * (self.n_parallel + 1)
        params.n_batch = max(n_batch, 64)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {self.n_parallel} sequences of {n_ctx_seq} tokens (out of memory?)")
        self.n_ctx_seq = lc.llama_n_ctx(self.ctx) // (self.n_parallel + 1)
        self.n_batch = lc.llama_n_batch(self.ctx)
        self.mem = lc.llama_get_memory(self.ctx)
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.grammar = grammar
        self.slots = [_Slot(seq=s, sampler=None) for s in range(self.n_parallel)]
        try:
            for slot in self.slots:
                self._use_grammar(slot, grammar)
        except RuntimeError:
            self.close()
            raise
        # Candidate arrays for the sampler: one token (the greedy check) and the whole vocabulary.
        self._one = (lc.llama_token_data * 1)()
        self._one_arr = lc.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._all = (lc.llama_token_data * self.n_vocab)()
        self._all_arr = lc.llama_token_data_array(data=self._all, size=self.n_vocab, selected=-1, sorted=False)
        self._all_np = np.frombuffer(self._all, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.prefix: list[int] = []
        # More threads than n_threads_batch while other processes leave cores idle.
        self.base_threads, self.max_threads = n_threads_batch, max(max_threads, n_threads_batch)
        self.idle = IdleCores() if self.max_threads > self.base_threads else None
        self.threads_now = n_threads_batch
        self.thread_steps: dict[int, int] = {}  # decode steps per thread count (for benchmarks)
        self.full_grammar_passes = 0  # how often the argmax token was rejected (for benchmarks)
        self.steps = 0
        if prefix:
            self.set_prefix(prefix)

    # -- the shared prefix ------------------------------------------------------------------
    def set_prefix(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` once into the prefix sequence (no logits)."""
        tokens = list(tokens)[: self.n_ctx_seq - 1]
        lc = self.lc
        lc.llama_memory_seq_rm(self.mem, self.prefix_seq, -1, -1)
        self.prefix = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self._clear_batch()
            for i, tok in enumerate(chunk):
                self._add(tok, start + i, self.prefix_seq, False)
            self._decode()
        self.prefix = tokens

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], max_tokens: int) -> list[Generation | Exception]:
        """One Generation per prompt, in order; a prompt that does not fit gets a ValueError
        (the others still run). Raises only when llama.cpp itself fails (the whole call)."""
        results: list[Generation | Exception | None] = [None] * len(prompts)
        queue = deque()
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
        return results  # type: ignore[return-value]

    def _use_grammar(self, slot: _Slot, grammar) -> None:
        """Give the slot a sampler for ``grammar`` (kept while the next item uses the same one)."""
        lc = self.lc
        if slot.sampler and slot.grammar is grammar:
            lc.llama_sampler_reset(slot.sampler)
            return
        if slot.sampler:
            lc.llama_sampler_free(slot.sampler)
        slot.sampler = lc.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode(), grammar._root.encode())
        slot.grammar = grammar if slot.sampler else None
        if not slot.sampler:
            raise RuntimeError("llama.cpp rejected the grammar")

    def _start(self, slot: _Slot, index: int, prompt: Prompt, max_tokens: int) -> None:
        lc = self.lc
        slot.index, slot.prompt, slot.out, slot.text, slot.pending = index, prompt, [], b"", None
        n = len(prompt.tokens)
        # as create_completion: never past the context
        slot.max_tokens = max_tokens if max_tokens + n < self.n_ctx_seq else self.n_ctx_seq - n
        self._use_grammar(slot, prompt.grammar or self.grammar)
        # Start from the shared prefix where the prompt begins with it; at least the last
        # prompt token is evaluated, for its logits.
        match = min(common_prefix(self.prefix, prompt.tokens), n - 1)
        if match > 0:
            lc.llama_memory_seq_cp(self.mem, self.prefix_seq, slot.seq, -1, -1)  # whole sequence
            lc.llama_memory_seq_rm(self.mem, slot.seq, match, -1)
        else:
            lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.n_past = match

    def _free(self, slot: _Slot) -> None:
        slot.index, slot.prompt, slot.pending, slot.logit_row = -1, None, None, -1
        self.lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)

    def _clear_batch(self) -> None:
        self.batch.n_tokens = 0

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.batch, self.batch.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def _decode(self) -> None:
        if self.idle is not None:
            n = self.idle.threads(self.base_threads, self.max_threads)
            if n != self.threads_now:
                self.lc.llama_set_n_threads(self.ctx, n, n)
                self.threads_now = n
        self.thread_steps[self.threads_now] = self.thread_steps.get(self.threads_now, 0) + 1
        rc = self.lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc}) for a batch of {self.batch.n_tokens} tokens")
        self.steps += 1

    def _step(self, active: list[_Slot]) -> None:
        """One llama_decode: every decoding slot's pending token, then as much prompt as fits."""
        self._clear_batch()
        budget = self.n_batch
        for slot in active:
            slot.logit_row = -1
            if slot.pending is not None:
                slot.logit_row = self._add(slot.pending, slot.n_past, slot.seq, True)
                slot.n_past += 1
                slot.pending = None
                budget -= 1
        for slot in active:
            tokens = slot.prompt.tokens
            if slot.logit_row >= 0 or slot.n_past >= len(tokens) or budget <= 0:
                continue
            take = min(budget, len(tokens) - slot.n_past)
            for pos in range(slot.n_past, slot.n_past + take):
                row = self._add(tokens[pos], pos, slot.seq, pos == len(tokens) - 1)
            if slot.n_past + take == len(tokens):
                slot.logit_row = row
            slot.n_past += take
            budget -= take
        self._decode()

    def _sample(self, slot: _Slot) -> Generation | None:
        """Pick the slot's next token; a Generation when the item is finished."""
        lc = self.lc
        ptr = lc.llama_get_logits_ith(self.ctx, slot.logit_row)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        token = int(np.argmax(logits))
        one = self._one[0]
        one.id, one.logit, one.p = token, float(logits[token]), 0.0
        self._one_arr.selected, self._one_arr.sorted = -1, False
        lc.llama_sampler_apply(slot.sampler, ctypes.byref(self._one_arr))
        if one.logit == -np.inf:  # the grammar rejects the argmax: the full pass
            self.full_grammar_passes += 1
            view = self._all_np
            view["id"] = self._ids
            view["logit"] = logits
            self._all_arr.size, self._all_arr.selected, self._all_arr.sorted = self.n_vocab, -1, False
            lc.llama_sampler_apply(slot.sampler, ctypes.byref(self._all_arr))
            token = int(np.argmax(view["logit"]))
            if view["logit"][token] == -np.inf:
                return self._finish(slot, "stop")  # the grammar allows nothing more
        lc.llama_sampler_accept(slot.sampler, token)
        if lc.llama_vocab_is_eog(self.vocab, token):
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
        lc = self.lc
        for slot in getattr(self, "slots", []):
            if slot.sampler:
                lc.llama_sampler_free(slot.sampler)
                slot.sampler = None
        if getattr(self, "batch", None) is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
            self.ctx = None
