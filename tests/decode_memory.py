"""Peak memory of the vision stage reading one batch of large images (run as a process of
its own, the peak RSS, VmHWM, reset just before the batch): ``python -m tests.decode_memory KIND COUNT``.

KIND ``bomb``: 20,000 x 20,000 one-bit PNGs (48 KB each); ``truncated``: 8,000 x 8,000 grey
PNGs cut in half (a decoder allocates the whole image, then fails). Prints one JSON line:
the errors, and the peak RSS above the process's RSS before the batch, in MB."""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path


def png(path: Path, width: int, height: int, bit_depth: int, keep: float = 1.0, blank: bool = False) -> None:
    """A real PNG, written a row at a time (never the whole image in memory); ``blank``: every
    pixel 0 (a 20,000 x 20,000 one-bit one is 48 KB), else a byte ramp; ``keep``: the share of
    its compressed data kept (below 1: truncated)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(6)
    row = b"\x00" + bytes(range(256)) * ((width * bit_depth + 7) // 8 // 256 + 1)
    row = row[: 1 + (width * bit_depth + 7) // 8]
    if blank:
        row = bytes(len(row))
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    idat = idat[: int(len(idat) * keep)]
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", idat)
            + (chunk(b"IEND", b"") if keep == 1.0 else b"")
        )


def main(kind: str, count: int) -> None:
    from consumers.vision import VisionTransform
    from imgflow.events import local_image_event
    from imgflow.settings import Settings
    from imgflow.stage import InputRecord

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = []
        for i in range(count):
            path = folder / f"{kind}_{i}.png"
            if kind == "bomb":
                png(path, 20_000, 20_000, 1, blank=True)
            else:
                png(path, 8_000, 8_000, 8, keep=0.5)
            event = local_image_event(path, path.stat(), source="test", run_id="t")
            records.append(InputRecord("t", 0, i, event["event_id"], event, None))
        transform = VisionTransform(Settings(allowed_roots=[folder]), models=object())  # no model is reached
        before = _reset_peak_rss()
        results = transform.process(records)
        peak = _peak_rss()
    print(json.dumps({"errors": [str(r) for r in results], "peak_above_start_mb": (peak - before) / 1024}))


def _peak_rss() -> int:
    """VmHWM, kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> int:
    """Start the peak afresh at the RSS now (the imports' peak is not the batch's); kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
