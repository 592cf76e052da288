"""Faces, so that a photo of a person is called one: the ImageNet-1k classifier has no person
class (an astronaut comes out as a "military uniform" or nothing at all).

MTCNN (three small cascaded CNNs: P-Net, R-Net, O-Net; Zhang et al. 2016), with the weights
that ship inside the ``facenet-pytorch`` wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``,
2 MB together). The networks are built from facenet-pytorch's classes and the weights loaded
here from explicit paths (``weights_only``), never from its download code.

A face counts as a person in the picture when MTCNN's final score reaches ``min_score`` and
the face is at least ``min_height`` of the image's height (a face in a crowd far away does not
make the image a photo of a person; smaller faces are not even searched for, which keeps the
detector cheap). Haar and LBP cascades (OpenCV 4.x, scikit-image) were measured on the same
photos and found far fewer of the faces (24 and 19 of 40) with more false ones (4 and 3 of
202 photos without a person) than MTCNN (40 of 40, none); README "Output quality".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.models.base import CachedModelAdapter
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import resolve_device
from imgflow.models.packages import package_dir
from imgflow.models.rgb import to_rgb

NAME = "mtcnn"
PACKAGE = "facenet_pytorch"
_FILES = {"pnet": "pnet.pt", "rnet": "rnet.pt", "onet": "onet.pt"}
# MTCNN's own per-stage cut-offs and pyramid factor (the published defaults).
STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
MIN_FACE_PX = 12  # P-Net's window: smaller faces cannot be found at any scale
# Chosen on the quality set's tune split only (benchmarks/quality_set.py), at the pipeline's
# image size (models.image_max_size 384): its faces score >= 0.9985, its best false faces
# 0.855 (a motorcycle's tank) and 0.852 (a turned cat's face); 0.98 is about halfway between
# in log-odds. Defaults of models.face_min_score / face_min_height.
DEFAULT_MIN_SCORE = 0.98
# A head is about 1/8 of a standing person's height: a full-length portrait's face is ~0.08
# of the image's height; the smallest face of the tune split is 0.13.
DEFAULT_MIN_HEIGHT = 0.06


def model_files() -> dict[str, Path]:
    d = package_dir(PACKAGE)
    base = (d if d is not None else Path(f"{PACKAGE} (not installed)")) / "data"
    return {k: base / v for k, v in _FILES.items()}


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image given
    score: float  # MTCNN's O-Net probability that this is a face
    height: float  # the box's height as a share of the image's height


class _Mtcnn:
    """The cache entry: the three networks, weights loaded from ``files``."""

    def __init__(self, files: dict[str, Path], device: str) -> None:
        import torch
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
        from facenet_pytorch.models.utils.detect_face import detect_face

        self._torch = torch
        self._detect_face = detect_face
        self.device = device
        nets = {}
        for name, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
            net = cls(pretrained=False)
            net.load_state_dict(torch.load(str(files[name]), map_location="cpu", weights_only=True))
            nets[name] = net.eval().to(device)
        self.pnet, self.rnet, self.onet = nets["pnet"], nets["rnet"], nets["onet"]
        self._lock = threading.Lock()

    def detect(self, img: Image.Image, min_face: int) -> list[tuple[tuple[float, float, float, float], float]]:
        """(box, score) of every face at least ``min_face`` pixels tall, best first."""
        img = to_rgb(img)
        if min(img.size) < min_face:  # no pyramid scale fits: nothing to find
            return []
        torch = self._torch
        with self._lock, torch.inference_mode():
            arr = torch.as_tensor(np.asarray(img, dtype=np.uint8).copy(), device=self.device)
            boxes, _ = self._detect_face(arr.unsqueeze(0), min_face, self.pnet, self.rnet, self.onet, list(STAGE_THRESHOLDS), PYRAMID_FACTOR, self.device)
        rows = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5) if len(boxes) else np.zeros((0, 5))
        out = [((float(r[0]), float(r[1]), float(r[2]), float(r[3])), float(r[4])) for r in rows]
        return sorted(out, key=lambda f: -f[1])

    def close(self) -> None:
        self.pnet = self.rnet = self.onet = None


class MtcnnFaceDetector(CachedModelAdapter):
    """Faces in images. Not one of the stage contracts: the embedded describer uses it
    (``models.faces``)."""

    id_name = NAME
    job = "detect_faces"
    setting = "faces"  # the settings field that turns it on and off

    def __init__(
        self,
        cache: ModelCache,
        device: str = "auto",
        min_score: float = DEFAULT_MIN_SCORE,
        min_height: float = DEFAULT_MIN_HEIGHT,
        files: dict[str, Path] | None = None,
    ) -> None:
        super().__init__(cache)
        self._device = device
        self.min_score = float(min_score)
        self.min_height = float(min_height)
        self.files = dict(files) if files is not None else model_files()
        self.cache_key = NAME if self.files == model_files() else f"{NAME}:{self.files['pnet']}"

    @property
    def source(self) -> str:
        return str(Path(self.files["pnet"]).parent)

    def required_files(self) -> list[Path]:
        return list(self.files.values())

    def _load(self) -> _Mtcnn:
        return _Mtcnn(self.files, resolve_device(self._device))

    def _net(self) -> _Mtcnn:
        return self._model()

    def detect(self, images: list[Image.Image]) -> list[list[Face]]:
        """Per image, every face MTCNN finds (its own stage cut-offs) down to ``min_height``
        of the image's height, best first. The pyramid starts at that size: smaller faces
        are not searched for (each smaller scale costs more than the larger ones together)."""
        if not images:
            return []
        net = self._net()
        out = []
        for img in images:
            h = img.size[1]
            min_face = max(MIN_FACE_PX, int(self.min_height * h))
            out.append([Face(box, score, (box[3] - box[1]) / h) for box, score in net.detect(img, min_face)])
        return out

    def people(self, images: list[Image.Image]) -> list[list[Face]]:
        """Per image, the faces that make it a picture of people: score >= ``min_score`` and
        height >= ``min_height`` of the image's, best first."""
        return [[f for f in faces if f.score >= self.min_score and f.height >= self.min_height] for faces in self.detect(images)]
