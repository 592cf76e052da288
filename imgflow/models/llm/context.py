"""The llama.cpp context the batched engine decodes in, and its KV cache.

One context beside the ``Llama``'s, its parameters copied from the ``Llama`` (flash attention
off as ``Llama`` sets it: llama.cpp's own default turns it on and changes outputs), with
``n_seq_max`` = parallel slots + 1 and ``kv_unified = False`` (a unified KV cache changed
outputs); each slot has ``n_ctx_seq`` cells of its own. The prompt prefix every prompt shares
(chat template + system prompt) is evaluated once into the extra sequence and copied into a
slot (``llama_memory_seq_cp``) when an item starts there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgflow.models.llm.chat import common_prefix
from imgflow.models.llm.idle_cores import IdleCores


class SequenceContext:
    """``n_parallel`` sequences plus the prefix sequence, one ``llama_batch`` and
    ``llama_decode`` with as many threads as idle cores allow (``max_threads``)."""

    def __init__(self, lc: Any, llm: Any, n_parallel: int, n_ctx_seq: int, n_threads: int, n_threads_batch: int, n_batch: int, max_threads: int) -> None:
        self.lc = lc
        self.prefix_seq = n_parallel  # the extra sequence holding the shared prefix
        params = lc.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = n_parallel + 1
        params.kv_unified = False
        params.n_ctx = n_ctx_seq * (n_parallel + 1)
        params.n_batch = max(n_batch, 64)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {n_parallel} sequences of {n_ctx_seq} tokens (out of memory?)")
        self.n_ctx_seq = lc.llama_n_ctx(self.ctx) // (n_parallel + 1)
        self.n_batch = lc.llama_n_batch(self.ctx)
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.prefix: list[int] = []
        # More threads than n_threads_batch while other processes leave cores idle.
        self.base_threads, self.max_threads = n_threads_batch, max(max_threads, n_threads_batch)
        self.idle = IdleCores() if self.max_threads > self.base_threads else None
        self.threads_now = n_threads_batch
        self.thread_steps: dict[int, int] = {}  # decode steps per thread count (for benchmarks)
        self.steps = 0

    # -- the batch ----------------------------------------------------------------------------
    def clear_batch(self) -> None:
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Put one token in the batch; its row (where its logits will be, when asked for)."""
        b, i = self.batch, self.batch.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def decode(self) -> None:
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

    def logits(self, row: int, n_vocab: int) -> np.ndarray:
        """The logits of a batch row of the last decode (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, row), shape=(n_vocab,))

    # -- the KV cache ------------------------------------------------------------------------
    def set_prefix(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` once into the prefix sequence (no logits)."""
        tokens = list(tokens)[: self.n_ctx_seq - 1]
        self.lc.llama_memory_seq_rm(self.mem, self.prefix_seq, -1, -1)
        self.prefix = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self.clear_batch()
            for i, tok in enumerate(chunk):
                self.add(tok, start + i, self.prefix_seq, False)
            self.decode()
        self.prefix = tokens

    def start(self, seq: int, tokens: list[int]) -> int:
        """Make ``seq`` hold as much of ``tokens`` as the shared prefix has; how many tokens
        that is (at least the last prompt token is left, to be evaluated for its logits)."""
        match = min(common_prefix(self.prefix, tokens), len(tokens) - 1)
        if match > 0:
            self.lc.llama_memory_seq_cp(self.mem, self.prefix_seq, seq, -1, -1)  # whole sequence
            self.lc.llama_memory_seq_rm(self.mem, seq, match, -1)
        else:
            self.forget(seq)
        return match

    def forget(self, seq: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)
            self.ctx = None
