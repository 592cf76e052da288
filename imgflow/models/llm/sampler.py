"""Greedy sampling under a grammar, one sampler per decoding slot.

The argmax token is checked against the grammar first; only when the grammar rejects it is
the grammar applied to the whole vocabulary (what llama.cpp's own sampler does; the chosen
token is the same as a full pass's)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class Candidates:
    """The candidate arrays the samplers fill: one token (the greedy check) and the whole
    vocabulary. Shared by every slot of a generator (slots sample one at a time)."""

    def __init__(self, lc: Any, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.one = (lc.llama_token_data * 1)()
        self.one_arr = lc.llama_token_data_array(data=self.one, size=1, selected=-1, sorted=False)
        self.all = (lc.llama_token_data * n_vocab)()
        self.all_arr = lc.llama_token_data_array(data=self.all, size=n_vocab, selected=-1, sorted=False)
        self.all_np: np.ndarray = np.frombuffer(self.all, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self.ids: np.ndarray = np.arange(n_vocab, dtype=np.int32)
        self.full_grammar_passes = 0  # how often the argmax token was rejected (for benchmarks)


class GrammarSampler:
    """One slot's grammar sampler (``llama_sampler_p``), kept while the next item uses the
    same grammar."""

    def __init__(self, lc: Any, vocab: Any, candidates: Candidates) -> None:
        self.lc, self.vocab, self.candidates = lc, vocab, candidates
        self.sampler: Any = None
        self.grammar: Any = None  # the LlamaGrammar the sampler was made from

    def use(self, grammar: Any) -> None:
        """Start an item under ``grammar``: reset the sampler, or make one for a new grammar."""
        lc = self.lc
        if self.sampler and self.grammar is grammar:
            lc.llama_sampler_reset(self.sampler)
            return
        if self.sampler:
            lc.llama_sampler_free(self.sampler)
        self.sampler = lc.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode(), grammar._root.encode())
        self.grammar = grammar if self.sampler else None
        if not self.sampler:
            raise RuntimeError("llama.cpp rejected the grammar")

    def pick(self, logits: np.ndarray) -> int | None:
        """The greedy token the grammar allows (accepted into the grammar's state); None when
        the grammar allows nothing more."""
        lc, c = self.lc, self.candidates
        token = int(np.argmax(logits))
        one = c.one[0]
        one.id, one.logit, one.p = token, float(logits[token]), 0.0
        c.one_arr.selected, c.one_arr.sorted = -1, False
        lc.llama_sampler_apply(self.sampler, ctypes.byref(c.one_arr))
        if one.logit == -np.inf:  # the grammar rejects the argmax: the full pass
            c.full_grammar_passes += 1
            view = c.all_np
            view["id"] = c.ids
            view["logit"] = logits
            c.all_arr.size, c.all_arr.selected, c.all_arr.sorted = c.n_vocab, -1, False
            lc.llama_sampler_apply(self.sampler, ctypes.byref(c.all_arr))
            token = int(np.argmax(view["logit"]))
            if view["logit"][token] == -np.inf:
                return None
        lc.llama_sampler_accept(self.sampler, token)
        return token

    def close(self) -> None:
        if self.sampler:
            self.lc.llama_sampler_free(self.sampler)
            self.sampler = None
