"""The labelled evaluation set of the quality benchmark (``benchmarks/quality.py``).

Real photographs that ship inside installed packages (no download): scikit-image's, and, in
the holdout split only, scikit-learn's and matplotlib's (photos no threshold was ever chosen
on); transformed (rotated, cropped, mirrored, scaled, darkened); and rendered signs, tickets and receipts in several fonts,
sizes, colours and angles; some photos carry a small pasted label (text on a photo). Each
item says its expected category, the words that name its subject, and the exact text it
shows (None: none).

Two splits: ``tune`` (thresholds were chosen on it) and ``holdout`` (never looked at while
tuning: other transforms, other texts, other fonts). Everything is deterministic (fixed
seeds), so a run is repeatable; fonts: the DejaVu fonts where the system has them, and
Pillow's own scalable default font always.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps


@dataclass
class EvalItem:
    id: str
    image: Image.Image = field(repr=False)
    kind: str  # photo | photo_text | text
    category: str
    split: str  # tune | holdout
    subject: list[str]  # words naming the subject (any one counts)
    related: list[str] = field(default_factory=list)  # other words a keyword may truthfully use
    text: str | None = None  # exact text shown (lines joined by "\n"); None: no text
    also_ok: list[str] = field(default_factory=list)  # other categories that are also right
    may_read: list[str] = field(default_factory=list)  # small real text in the photo: no error either way
    source: str = "rendered"  # the package the photo ships in; "rendered": drawn here
    unseen: bool = False  # a photo of OTHER_PHOTOS: no variant of it is in the tune split

    def label(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "category": self.category,
            "split": self.split,
            "subject": self.subject,
            "related": self.related,
            "text": self.text,
            "also_ok": self.also_ok,
            "may_read": self.may_read,
            "source": self.source,
            "unseen": self.unseen,
        }


# scikit-image photo -> (category, subject words, related words, other right categories)
PHOTOS = {
    "chelsea": ("animal", ["cat"], ["tabby", "kitten", "pet", "feline", "egyptian", "tiger"], []),
    "coffee": ("drink", ["coffee", "espresso", "cup"], ["mug", "saucer", "spoon", "drink", "beverage"], ["food"]),
    "rocket": ("vehicle", ["rocket", "missile", "space shuttle", "spacecraft", "projectile"], ["launch", "pad", "tower", "space", "nasa"], []),
    "camera": ("device", ["camera", "tripod"], ["photographer", "man", "person", "lens", "reflex", "equipment", "photography"], ["person"]),
    "motorcycle": ("vehicle", ["motorcycle", "moped", "motorbike", "scooter", "bike"], ["motor", "engine", "wheel", "helmet", "crash"], []),
    "astronaut": ("person", ["astronaut", "person", "woman"], ["space", "suit", "flag", "uniform", "shuttle"], ["clothing"]),
}
_SKIMAGE = {"motorcycle": "stereo_motorcycle"}
# Real text in the photos themselves (the motorcycle's tank badge): reading it is right, and so
# is leaving it out; anything else read there is false text.
MAY_READ = {"motorcycle": ["YAMAHA"], "grace_hopper": ["COMO HOPPER"]}  # her name tag

# Photos from other packages, in the holdout split only (with its transforms): never looked at
# while choosing a threshold. name -> (package, category, subject words, related words, other
# right categories). Labelled as a person would, not from what the models say.
OTHER_PHOTOS = {
    # scikit-learn: sklearn/datasets/images/china.jpg (the Summer Palace's pagoda, Beijing)
    "china": (
        "scikit-learn",
        "building",
        ["pagoda", "temple", "tower", "palace", "building"],
        ["chinese", "roof", "lake", "water", "tree", "trees", "sky", "architecture"],
        [],
    ),
    # scikit-learn: sklearn/datasets/images/flower.jpg (a dahlia)
    "flower": ("scikit-learn", "plant", ["flower", "dahlia", "blossom", "bloom"], ["plant", "petals", "petal", "orange", "leaves", "garden"], []),
    # matplotlib: mpl-data/sample_data/grace_hopper.jpg (a portrait in naval uniform)
    "grace_hopper": (
        "matplotlib",
        "person",
        ["person", "woman", "officer", "portrait"],
        ["uniform", "military", "navy", "naval", "cap", "hat", "glasses", "flag", "tie", "medals", "suit", "hopper", "commodore", "como"],
        [],
    ),
    # scikit-image: coins.png (ancient Greek coins), not used in the tune split either
    "coins": ("scikit-image", "object", ["coin", "coins", "money"], ["silver", "ancient", "metal", "currency", "grey"], []),
}

# (split, transform name): tune and holdout use different transforms.
PHOTO_VARIANTS = {
    "tune": ["original", "rotate+12", "crop80", "mirror"],
    "holdout": ["rotate-15", "crop70-left", "scale50", "dark"],
}

SIGNS = {
    "tune": ["EXIT", "NO PARKING", "OPEN 24 HOURS", "PUSH", "STAFF ONLY", "PLATFORM 3"],
    "holdout": ["STOP", "WET FLOOR", "CLOSED", "GATE 12", "KEEP LEFT", "FIRE EXIT"],
}
DOCUMENTS = {
    "tune": [
        ["HARBOR TICKET 2041", "ADULT SINGLE", "VALID TODAY ONLY"],
        ["CORNER CAFE", "LATTE 3.50", "BAGEL 2.25", "TOTAL 5.75"],
        ["CITY MUSEUM", "ENTRY PASS", "ROOM 14", "THANK YOU"],
        ["TRAIN 417 TO OSLO", "CAR 6 SEAT 22", "DEPARTS 09:15"],
        ["GREEN MARKET", "APPLES 4.10", "BREAD 2.80", "MILK 1.20", "TOTAL 8.10"],
    ],
    "holdout": [
        ["FERRY PASS 118", "RETURN TRIP", "PIER 7"],
        ["BOOK STORE", "NOVEL 12.99", "MAP 4.50", "TOTAL 17.49"],
        ["CONCERT TICKET", "ROW F SEAT 9", "DOORS 19:30"],
        ["PARKING RECEIPT", "ZONE B", "PAID 6.00"],
        ["BUS 42 NORTH", "ZONE 2", "SINGLE FARE"],
    ],
}
# Small labels pasted on photos: (photo, text). Read exactly or not at all, never garbled.
PHOTO_LABELS = {"tune": [("motorcycle", "SPEED"), ("coffee", "CAFE")], "holdout": [("rocket", "APOLLO"), ("chelsea", "HOME")]}

FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed.ttf"]
FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"), Path("/usr/share/fonts/TTF")]
SIGN_COLOURS = [("white", "black"), ("#c8102e", "white"), ("#ffd100", "black"), ("#0b5394", "white"), ("#1e7b34", "white"), ("#f2f2f2", "#202020")]


def fonts() -> list[tuple[str, object]]:
    """(name, loader(size)) for every usable font: DejaVu files if present, Pillow's default."""
    out = []
    for name in FONT_FILES:
        for d in FONT_DIRS:
            if (d / name).is_file():
                out.append((name, lambda size, p=str(d / name): ImageFont.truetype(p, size)))
                break
    out.append(("pillow-default", lambda size: ImageFont.load_default(size=size)))
    return out


def other_photo(name: str) -> Image.Image:
    """A photo of OTHER_PHOTOS, from the package that ships it."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    if name == "grace_hopper":
        from matplotlib import cbook

        return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return skimage_photo(name)


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, _SKIMAGE.get(name, name))()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
        arr = arr[0]
    return Image.fromarray(arr).convert("RGB")


def transform(img: Image.Image, how: str) -> Image.Image:
    w, h = img.size
    if how == "original":
        return img
    if how.startswith("rotate"):
        return img.rotate(float(how[6:]), resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    if how == "crop80":
        return img.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    if how == "crop70-left":
        return img.crop((0, int(h * 0.15), int(w * 0.7), int(h * 0.85)))
    if how == "mirror":
        return ImageOps.mirror(img)
    if how == "scale50":
        return img.resize((w // 2, h // 2), Image.LANCZOS)
    if how == "dark":
        return ImageEnhance.Brightness(img).enhance(0.6)
    raise ValueError(how)


def render(lines: list[str], font, size: int, colours: tuple[str, str], angle: float, pad: int, rng: random.Random) -> Image.Image:
    f = font(size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [draw.textbbox((0, 0), line, font=f) for line in lines]
    line_h = max(b[3] - b[1] for b in boxes)
    width = max(b[2] - b[0] for b in boxes) + 2 * pad
    height = int(line_h * 1.6) * len(lines) + 2 * pad
    img = Image.new("RGB", (width, height), colours[0])
    d = ImageDraw.Draw(img)
    y = pad
    for line, b in zip(lines, boxes):
        d.text((pad - b[0], y - b[1]), line, fill=colours[1], font=f)
        y += int(line_h * 1.6)
    if angle:
        img = img.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=colours[0])
    # a little sensor noise, so that it is not a perfectly clean synthetic page
    noise = Image.effect_noise(img.size, 12).convert("RGB")
    return Image.blend(img, noise, 0.06 + 0.04 * rng.random())


def paste_label(img: Image.Image, text: str, font) -> Image.Image:
    img = img.copy()
    w, h = img.size
    size = max(14, h // 18)
    f = font(size)
    d = ImageDraw.Draw(img)
    b = d.textbbox((0, 0), text, font=f)
    x, y = w - (b[2] - b[0]) - w // 12, h - (b[3] - b[1]) - h // 10
    d.rectangle((x - 6, y - 4 + b[1], x + b[2] + 6, y + b[3] + 4), fill="white")
    d.text((x, y), text, fill="black", font=f)
    return img


def photo_item(
    item_id: str, image: Image.Image, split: str, name: str, labels: tuple, text: str | None = None, source: str = "scikit-image", unseen: bool = False
) -> EvalItem:
    """A photo of the set (``text``: the label pasted on it); ``labels``: (category, subject,
    related, also_ok) as PHOTOS and OTHER_PHOTOS hold them."""
    cat, subject, related, also = labels
    return EvalItem(item_id, image, "photo" if text is None else "photo_text", cat, split, subject, related, text, also, MAY_READ.get(name, []), source, unseen)


def build(splits: tuple[str, ...] = ("tune", "holdout"), limit: int | None = None) -> list[EvalItem]:
    rng = random.Random(11)
    fl = fonts()
    items: list[EvalItem] = []
    photos = {name: skimage_photo(name) for name in PHOTOS}
    for split in splits:
        for name in PHOTOS:
            for how in PHOTO_VARIANTS[split]:
                items.append(photo_item(f"{split}-photo-{name}-{how}", transform(photos[name], how), split, name, PHOTOS[name]))
        if split == "holdout":
            for name, (package, *labels) in OTHER_PHOTOS.items():
                photo = other_photo(name)
                for how in PHOTO_VARIANTS[split]:
                    item_id = f"{split}-photo-{name}-{how}"
                    items.append(photo_item(item_id, transform(photo, how), split, name, tuple(labels), source=package, unseen=True))
        for k, (name, text) in enumerate(PHOTO_LABELS[split]):
            img = paste_label(photos[name], text, fl[k % len(fl)][1])
            items.append(photo_item(f"{split}-phototext-{name}-{text.lower()}", img, split, name, PHOTOS[name], text=text))
        offset = 0 if split == "tune" else 3  # holdout starts at other fonts and colours
        for k, text in enumerate(SIGNS[split]):
            fname, font = fl[(k + offset) % len(fl)]
            colours = SIGN_COLOURS[(k + offset) % len(SIGN_COLOURS)]
            angle = [0, 4, -6, 8, -3, 0][k % 6]
            img = render(text.split("\n"), font, [64, 48, 80, 56, 40, 72][k % 6], colours, angle, 40, rng)
            items.append(EvalItem(f"{split}-sign-{k}-{fname}", img, "text", "sign", split, ["sign"] + text.lower().split(), [], text, []))
        for k, lines in enumerate(DOCUMENTS[split]):
            fname, font = fl[(k + 2 + offset) % len(fl)]
            angle = [0, -3, 5, 2, -7][k % 5]
            img = render(lines, font, [32, 28, 36, 26, 30][k % 5], ("white", "black"), angle, 30, rng)
            subject = ["ticket", "receipt", "document", "pass"] + lines[0].lower().split()
            items.append(EvalItem(f"{split}-document-{k}-{fname}", img, "text", "document", split, subject, [], "\n".join(lines), []))
    return items[:limit] if limit else items


def write_set(folder: Path, items: list[EvalItem]) -> Path:
    """The images as PNG files plus labels.json, for `imgflow run FOLDER` (e.g. on the GPU
    profile) and ``quality.py --score-csv``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for it in items:
        it.image.save(folder / f"{it.id}.png")
    (folder / "labels.json").write_text(json.dumps([it.label() for it in items], indent=1))
    return folder
