"""Qwen2-VL batch-size benchmark for the vision stage's VLM: images/s and peak GPU memory
at batch sizes 1, 4, 16, 32, all in one run so every number is compared with batch 1 on
the same card.

The model is Qwen2-VL-7B-Instruct-sized with random weights built from the real
architecture (``tests.tiny_models.qwen2vl_7b_config``, or ``--config`` a real
``config.json``), in bf16, on 384-px images (the pipeline's IMAGE_MAX_SIZE), prefill plus
``--new-tokens`` greedy tokens per image (``min_new_tokens`` fixes the length, so random
weights cost what real ones do). No weights are downloaded. ``--model FOLDER`` benchmarks a
real Qwen2-VL folder through the production adapter instead (real prompts, real answers).

On a GPU (about 17 GB for the weights, plus activations):
    python benchmarks/gpu_vlm_batch.py --out vlm_batch.json
Smoke test on CPU (a tiny model, a few images):
    python benchmarks/gpu_vlm_batch.py --tiny

A batch that runs out of CUDA memory is reported as OOM (the stage would halve it) and the
run goes on with the next size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch is imported (the vision stage does the same through models.cuda_alloc_conf).
if not os.environ.get("PYTORCH_ALLOC_CONF"):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    p.add_argument("--config", type=Path, help="a real Qwen2-VL config.json (default: built-in 7B architecture)")
    p.add_argument("--model", type=Path, help="a real Qwen2-VL folder: benchmark the production adapter")
    p.add_argument("--batch-sizes", default="1,4,16,32")
    p.add_argument("--images", type=int, default=0, help="images per batch size (default: 2 x the largest batch; --tiny: 8)")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--new-tokens", type=int, default=0, help="generated tokens per image (default 64; --tiny: 4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="sdpa", help="attn_implementation: eager | sdpa | flash_attention_2")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    if a.tiny:
        a.images = a.images or 8
        a.new_tokens = a.new_tokens or 4
    a.images = a.images or 2 * max(a.batch_sizes)
    a.new_tokens = a.new_tokens or 64
    return a


def random_images(n: int, size: int) -> list[Image.Image]:
    rs = np.random.RandomState(0)
    return [Image.fromarray(rs.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class RandomQwen2Vl:
    """A Qwen2-VL with random weights; inputs built without a tokenizer: random text ids
    around <|vision_start|> <|image_pad|> x n <|vision_end|>."""

    def __init__(self, args, device: str, dtype) -> None:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        from tests.tiny_models import qwen2vl_7b_config, tiny_qwen2vl_config

        if args.config:
            config = Qwen2VLConfig.from_pretrained(str(args.config))
        else:
            config = Qwen2VLConfig(**(tiny_qwen2vl_config() if args.tiny else qwen2vl_7b_config()))
        config._attn_implementation = args.attn
        self.config = config
        self.device = device
        torch.manual_seed(0)
        started = time.perf_counter()
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = Qwen2VLForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(default)
        self.build_s = time.perf_counter() - started
        self.params = sum(p.numel() for p in self.model.parameters())
        self.processor = Qwen2VLImageProcessor()
        text = config.text_config
        self.eos = text.eos_token_id
        self.vocab = text.vocab_size
        self.specials = {
            config.image_token_id,
            config.video_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
            text.eos_token_id,
            text.bos_token_id,
        }

    def _text_ids(self, rs, n: int) -> list[int]:
        low = min(1000, self.vocab // 4)
        ids = rs.randint(low, self.vocab - 1, n).tolist()
        return [i if i not in self.specials else low for i in ids]

    def run(self, images: list[Image.Image], new_tokens: int) -> None:
        c = self.config
        px = self.processor(images=images, return_tensors="pt")
        merge = c.vision_config.spatial_merge_size**2
        rs = np.random.RandomState(1)
        rows = []
        for thw in px["image_grid_thw"]:
            n = int(thw.prod()) // merge
            rows.append(self._text_ids(rs, 20) + [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id] + self._text_ids(rs, 12))
        input_ids = torch.tensor(rows, device=self.device)  # same-size images: no padding
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=px["pixel_values"].to(self.device, self.model.dtype),
                image_grid_thw=px["image_grid_thw"].to(self.device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.eos,
            )


class AdapterQwen2Vl:
    """A real folder through the production adapter (its describe prompt)."""

    def __init__(self, args, device: str, dtype_name: str) -> None:
        from imgflow.models.gpu.vlm import DESCRIBE_PROMPT, LoadedVlm, check_folder

        check_folder(args.model)
        started = time.perf_counter()
        self.loaded = LoadedVlm(args.model, device, dtype_name, args.attn)
        self.build_s = time.perf_counter() - started
        self.params = sum(p.numel() for p in self.loaded.model.parameters())
        self.prompt = DESCRIBE_PROMPT

    def run(self, images: list[Image.Image], new_tokens: int) -> None:
        self.loaded.generate(images, self.prompt, new_tokens)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    from imgflow.models.cuda import free_cuda_cache, is_cuda_oom, resolve_device
    from imgflow.models.gpu.vlm import torch_dtype

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    if device == "cpu" and not args.tiny and not args.model:
        print("warning: a 7B model on CPU is very slow; use --tiny for a smoke test", file=sys.stderr)
    bench = AdapterQwen2Vl(args, device, args.dtype) if args.model else RandomQwen2Vl(args, device, dtype)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"device {card}, dtype {dtype}, attn {args.attn}, {bench.params / 1e9:.2f} B params, "
        f"built/loaded in {bench.build_s:.1f} s, {args.images} images of {args.image_size} px, "
        f"{args.new_tokens} new tokens each",
        flush=True,
    )
    images = random_images(args.images, args.image_size)
    bench.run(images[:1], 2)  # warm-up: kernels, allocator
    results = []
    for bs in args.batch_sizes:
        row = {"batch_size": bs, "images": args.images}
        if device == "cuda":
            free_cuda_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            sync(device)
            started = time.perf_counter()
            for i in range(math.ceil(args.images / bs)):
                bench.run(images[i * bs : (i + 1) * bs], args.new_tokens)
            sync(device)
            took = time.perf_counter() - started
            row.update(seconds=round(took, 3), images_per_s=round(args.images / took, 3))
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            row.update(oom=True, error=str(exc).splitlines()[0])
            free_cuda_cache()
        if device == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / (1 << 30), 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["images_per_s"] for r in results if r["batch_size"] == 1 and "images_per_s" in r), None)
    print(f"\n{'batch':>5} {'images/s':>9} {'vs bs=1':>8} {'peak GiB':>9}")
    for r in results:
        ips = r.get("images_per_s")
        speed = f"{ips / base:.2f}x" if ips and base else "-"
        print(f"{r['batch_size']:>5} {('OOM' if r.get('oom') else f'{ips:.3f}'):>9} {speed:>8} {r.get('peak_gib', '-'):>9}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": card,
                    "dtype": str(dtype),
                    "attn": args.attn,
                    "params": bench.params,
                    "new_tokens": args.new_tokens,
                    "image_size": args.image_size,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
