"""The output that the search and web-page tests search: one real `imgflow run --once`, as a
user makes it (the sample folder plus a few images of our own), shared by the session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from imgflow.samples import render_text_image, write_samples

ROOT = Path(__file__).resolve().parents[1]
IMGFLOW = [sys.executable, "-m", "imgflow"]


def imgflow_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class SearchRun:
    images: Path
    out: Path
    data_dir: Path

    def env(self, **extra: str) -> dict:
        """The environment a user's later command has: the same data dir, the run's folder allowed."""
        return imgflow_env(IMGFLOW_DATA_DIR=str(self.data_dir), IMGFLOW_SINK__OUT_DIR=str(self.out), IMGFLOW_ALLOWED_ROOTS=f'["{self.images}"]', **extra)

    def imgflow(self, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*IMGFLOW, *args], cwd=ROOT, env=self.env(**extra), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def search_run(tmp_path_factory) -> SearchRun:
    """The sample folder (cat, coffee, astronaut, rocket, a ticket, a shop sign), a mirrored
    smaller copy of the cat, a sign whose
    text is markup (the page must show it as text), and a file that is not an image (an error
    row), through every stage of `imgflow run --once` on the embedded default."""
    images = write_samples(tmp_path_factory.mktemp("search-images"))
    render_text_image(["<b>BOLD</b> & <i>"]).save(images / "markup_sign.png")
    # a transformed copy of one photo: "more like this" on the cat must find it first
    load_image(images / "chelsea_cat.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 225)).save(images / "chelsea_mirrored.jpg", quality=80)
    (images / "broken.jpg").write_text("this is a text file, not a JPEG")
    work = tmp_path_factory.mktemp("search-run")
    run = SearchRun(images, work / "out", work / "data")
    proc = run.imgflow("run", str(images), "--once", "--out", str(run.out), "--data-dir", str(run.data_dir), "--metrics-port", "0", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")
