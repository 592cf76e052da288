"""ModelCache: LRU order, idle TTL, load-once, counters, thread safety."""

from __future__ import annotations

import threading
import time

import pytest

from imgflow.models.cache import ModelCache, get_model_cache, reset_model_cache
from imgflow.settings import Settings


class Model:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.log.append(f"close {self.name}")


class Unloadable:
    def __init__(self) -> None:
        self.unloaded = False

    def unload(self) -> None:
        self.unloaded = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def loader(name: str, log: list[str]):
    def load() -> Model:
        log.append(f"load {name}")
        return Model(name, log)

    return load


def test_lru_evicts_least_recently_used_and_closes_it():
    log: list[str] = []
    cache = ModelCache(2)
    a = cache.get("a", loader("a", log))
    cache.get("b", loader("b", log))
    cache.get("a", loader("a", log))  # a is now the most recent
    cache.get("c", loader("c", log))  # evicts b, not a
    assert cache.keys() == ["a", "c"]
    assert log == ["load a", "load b", "close b", "load c"]  # closed before c loads
    assert not a.closed
    cache.get("d", loader("d", log))  # evicts a
    assert a.closed and cache.keys() == ["c", "d"]
    assert cache.evictions == {"b": 1, "a": 1}


def test_loads_once_for_many_gets_and_counts():
    log: list[str] = []
    cache = ModelCache(3)
    first = cache.get("m", loader("m", log))
    for _ in range(9):
        assert cache.get("m", loader("m", log)) is first
    assert log == ["load m"]
    assert cache.hits == {"m": 9} and cache.misses == {"m": 1} and cache.loads == {"m": 1}
    assert cache.total_hits == 9 and cache.total_misses == 1
    assert cache.load_seconds["m"] >= 0.0
    assert "m" in cache and len(cache) == 1


def test_load_seconds_recorded_per_key():
    cache = ModelCache(2)
    cache.get("slow", lambda: time.sleep(0.05) or object())
    cache.get("fast", object)
    assert cache.load_seconds["slow"] >= 0.05
    assert cache.load_seconds["fast"] < 0.05


def test_idle_ttl_unloads_and_calls_close():
    log: list[str] = []
    clock = Clock()
    cache = ModelCache(3, ttl_s=10, clock=clock)
    a = cache.get("a", loader("a", log))
    clock.now = 5
    b = cache.get("b", loader("b", log))
    clock.now = 12  # a idle 12 s, b idle 7 s
    assert cache.evict_idle() == ["a"]
    assert a.closed and not b.closed
    assert cache.keys() == ["b"]
    clock.now = 30  # a get() also drops idle entries first
    a2 = cache.get("a", loader("a", log))
    assert b.closed and a2 is not a and cache.keys() == ["a"]
    assert cache.misses["a"] == 2


def test_ttl_zero_never_expires():
    clock = Clock()
    cache = ModelCache(2, ttl_s=0, clock=clock)
    cache.get("a", object)
    clock.now = 1e9
    assert cache.evict_idle() == [] and cache.keys() == ["a"]


def test_unload_method_is_called_when_there_is_no_close():
    cache = ModelCache(1)
    u = cache.get("u", Unloadable)
    cache.get("v", object)
    assert u.unloaded


def test_clear_and_evict():
    log: list[str] = []
    cache = ModelCache(3)
    a = cache.get("a", loader("a", log))
    b = cache.get("b", loader("b", log))
    assert cache.evict("a") and not cache.evict("a")
    assert a.closed
    cache.clear()
    assert b.closed and len(cache) == 0
    assert cache.hits == {} and cache.misses == {"a": 1, "b": 1}  # counters survive clear()


def test_failed_load_is_not_cached():
    cache = ModelCache(2)

    def boom():
        raise RuntimeError("no weights")

    with pytest.raises(RuntimeError):
        cache.get("x", boom)
    assert "x" not in cache
    assert cache.get("x", lambda: 42) == 42


def test_concurrent_gets_load_once():
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(2)
        return object()

    cache = ModelCache(2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert cache.misses["k"] == 1 and cache.hits["k"] == 7


def test_other_keys_stay_usable_while_one_loads():
    gate = threading.Event()
    cache = ModelCache(3)
    cache.get("fast", lambda: "ready")
    t = threading.Thread(target=lambda: cache.get("slow", lambda: gate.wait(2) or "slow"))
    t.start()
    time.sleep(0.02)
    start = time.perf_counter()
    assert cache.get("fast", lambda: "reloaded") == "ready"
    assert time.perf_counter() - start < 0.5
    gate.set()
    t.join(5)


def test_resize_evicts_down_to_capacity():
    cache = ModelCache(3)
    for k in "abc":
        cache.get(k, object)
    cache.resize(1)
    assert cache.keys() == ["c"]


def test_process_wide_default_follows_settings():
    reset_model_cache()
    try:
        c1 = get_model_cache(Settings(models={"cache_size": 4, "cache_ttl_s": 0}))
        assert c1.capacity == 4
        c2 = get_model_cache(Settings(models={"cache_size": 2, "cache_ttl_s": 5}))
        assert c2 is c1 and c1.capacity == 2 and c1.ttl_s == 5
    finally:
        reset_model_cache()


def test_bad_capacity():
    with pytest.raises(ValueError):
        ModelCache(0)


def test_a_cache_too_small_for_the_models_in_use_says_so(caplog):
    """Two models used in turn with room for one: each use reloads the other; the cache
    says which setting to raise (once per model)."""
    cache = ModelCache(1)
    with caplog.at_level("WARNING", logger="imgflow.models.cache"):
        for _ in range(3):
            cache.get("a", object)
            cache.get("b", object)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("models.cache_size" in w for w in warnings)
