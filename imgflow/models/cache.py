"""A small, thread-safe LRU cache of loaded models, with an optional idle TTL.

Adapters never hold on to a loaded model themselves: they call
``cache.get(key, loader)`` on each use, so that an entry the cache evicts is really
gone (its ``close()``/``unload()`` is called, then ``gc.collect()`` and, when CUDA is
in use, ``torch.cuda.empty_cache()``).

Counters (plain attributes, read them for metrics; no Prometheus import here):
``hits``, ``misses``, ``loads``, ``evictions`` (per key, ints), ``load_seconds``
(per key, seconds of the latest load), ``load_seconds_total`` (per key, all loads).
An optional ``listener(event, key, seconds)`` is told of every "hit", "miss", "load" (with
its seconds) and "evicted"; the process-wide cache (``get_model_cache``) uses it to feed the
Prometheus metrics ``imgflow_model_cache_total``, ``imgflow_model_loads_total`` and
``imgflow_model_load_seconds``.

An entry evicted while another thread still uses the object it returned is closed
under that thread; size the cache (``models.cache_size``) to at least the number of
models one process uses at once, so this does not happen in steady state.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from imgflow.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Entry:
    value: Any
    last_used: float


def _release(key: str, value: Any) -> None:
    """Close an evicted model and free its memory as far as Python lets us."""
    for name in ("close", "unload"):
        fn = getattr(value, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # a failing close must not break the caller
                log.warning("model %s: %s() failed on eviction", key, name, exc_info=True)
            break
    del value
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just to free memory
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            log.debug("torch.cuda.empty_cache() failed", exc_info=True)


class ModelCache:
    """LRU of at most ``capacity`` loaded models; ``ttl_s`` > 0 drops idle entries."""

    def __init__(
        self,
        capacity: int,
        ttl_s: float = 0,
        clock: Callable[[], float] = time.monotonic,
        listener: Callable[[str, str, float], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self.listener = listener
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.loads: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self.load_seconds: dict[str, float] = {}
        self.load_seconds_total: dict[str, float] = {}
        self._evicted_at: dict[str, float] = {}  # key -> when the LRU rule (not the TTL) dropped it
        self._thrash_warned: set[str] = set()

    # -- public API -------------------------------------------------------------------

    def get(self, key: str, loader: Callable[[], T]) -> T:
        """The model under ``key``; loads it with ``loader()`` on a miss (once, even
        when several threads ask at the same time). A loader exception propagates and
        nothing is cached."""
        self.evict_idle()
        with self._lock:
            value = self._hit(key)
            if value is not _MISSING:
                return value
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; other keys stay usable meanwhile
            with self._lock:
                value = self._hit(key)  # loaded by another thread while we waited
                if value is not _MISSING:
                    return value
                self.misses[key] = self.misses.get(key, 0) + 1
                self._tell("miss", key)
                self._warn_if_thrashing(key)
                # Make room first, so the old model's memory is free before loading.
                victims = self._pop_lru(room_for=1)
            self._release_all(victims)
            start = time.perf_counter()
            value = loader()
            took = time.perf_counter() - start
            log.info("model %s loaded in %.2f s", key, took)
            with self._lock:
                self.loads[key] = self.loads.get(key, 0) + 1
                self.load_seconds[key] = took
                self.load_seconds_total[key] = self.load_seconds_total.get(key, 0.0) + took
                self._entries[key] = _Entry(value, self._clock())
                self._entries.move_to_end(key)
                self._tell("load", key, took)
                victims = self._pop_lru(room_for=0)  # a concurrent load of another key
            self._release_all(victims)
            return value

    def evict_idle(self) -> list[str]:
        """Drop entries unused for more than ``ttl_s`` (no-op when ttl_s is 0).
        Returns the evicted keys."""
        if self.ttl_s <= 0:
            return []
        now = self._clock()
        with self._lock:
            victims = [(k, self._entries.pop(k).value) for k, e in list(self._entries.items()) if now - e.last_used > self.ttl_s]
            for k, _ in victims:
                self.evictions[k] = self.evictions.get(k, 0) + 1
        keys = [k for k, _ in victims]
        self._release_all(victims)
        return keys

    def evict(self, key: str) -> bool:
        """Drop one entry now; True if it was cached."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self.evictions[key] = self.evictions.get(key, 0) + 1
        self._release_all([(key, entry.value)])
        return True

    def clear(self) -> None:
        """Unload every entry (counters are kept)."""
        with self._lock:
            victims = [(k, e.value) for k, e in self._entries.items()]
            self._entries.clear()
            for k, _ in victims:
                self.evictions[k] = self.evictions.get(k, 0) + 1
        self._release_all(victims)

    def resize(self, capacity: int, ttl_s: float | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        with self._lock:
            self.capacity = int(capacity)
            if ttl_s is not None:
                self.ttl_s = float(ttl_s)
            victims = self._pop_lru(room_for=0)
        self._release_all(victims)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def total_misses(self) -> int:
        return sum(self.misses.values())

    # -- internals (call with self._lock held) ----------------------------------------

    def _hit(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        entry.last_used = self._clock()
        self._entries.move_to_end(key)
        self.hits[key] = self.hits.get(key, 0) + 1
        self._tell("hit", key)
        return entry.value

    def _tell(self, event: str, key: str, seconds: float = 0.0) -> None:
        if self.listener is not None:
            try:
                self.listener(event, key, seconds)
            except Exception:  # metrics must never break model loading
                log.debug("model cache listener failed", exc_info=True)

    def _warn_if_thrashing(self, key: str) -> None:
        """A model the LRU rule dropped shortly before is needed again: the cache is smaller
        than what this process uses at once, and every batch reloads models. Said once per key."""
        dropped = self._evicted_at.get(key)
        if dropped is not None and self._clock() - dropped < THRASH_WINDOW_S and key not in self._thrash_warned:
            self._thrash_warned.add(key)
            log.warning(
                "model %s was unloaded %.0f s ago to make room and is needed again: this "
                "process uses more models at once than models.cache_size (%d) holds, so "
                "they are reloaded over and over; raise models.cache_size "
                "(IMGFLOW_MODELS__CACHE_SIZE)",
                key,
                self._clock() - dropped,
                self.capacity,
            )

    def _pop_lru(self, room_for: int) -> list[tuple[str, Any]]:
        victims = []
        while self._entries and len(self._entries) + room_for > self.capacity:
            k, e = self._entries.popitem(last=False)
            self.evictions[k] = self.evictions.get(k, 0) + 1
            self._evicted_at[k] = self._clock()
            victims.append((k, e.value))
        return victims

    def _release_all(self, victims: list[tuple[str, Any]]) -> None:
        for k, v in victims:
            log.info("model %s unloaded", k)
            self._tell("evicted", k)
            _release(k, v)
        victims.clear()


_MISSING = object()
THRASH_WINDOW_S = 60.0

_default: ModelCache | None = None
_default_lock = threading.Lock()


def get_model_cache(settings: Settings | None = None) -> ModelCache:
    """The process-wide cache, sized from ``settings.models`` (cache_size, cache_ttl_s).
    A later call with other sizes resizes the same instance."""
    global _default
    if settings is None:
        from imgflow.settings import get_settings

        settings = get_settings()
    capacity, ttl = settings.models.cache_size, settings.models.cache_ttl_s
    with _default_lock:
        if _default is None:
            _default = ModelCache(capacity, ttl, listener=_export_metrics)
        elif (_default.capacity, _default.ttl_s) != (capacity, ttl):
            _default.resize(capacity, ttl)
        return _default


def _export_metrics(event: str, key: str, seconds: float) -> None:
    from imgflow import metrics

    if event == "load":
        metrics.MODEL_LOADS.labels(key).inc()
        metrics.MODEL_LOAD_SECONDS.labels(key).set(seconds)
    else:
        metrics.MODEL_CACHE.labels(event).inc()


def reset_model_cache() -> None:
    """Unload everything and forget the process-wide cache (tests)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.clear()
        _default = None
