"""Grounding rules for the structured record, shared by both profiles (both LLM adapters
derive from ``imgflow.models.llm.structurer.LlamaStructurer``).

The LLM sees only text (the notes built by ``notes``), never the image. What it may decide:
- ``category``: one of the candidates from ``imgflow.models.categories.candidates`` (on the
  embedded profile the classifier and the read text decide them; with no classifier labels,
  as on the GPU profile, any category of the closed list); anything else -> the first one.
- ``description``: one short sentence in its own words, kept only if it passes
  ``description_problem``: no percentages, no number the image's text does not show, no
  quoted text that was not read, no object (ImageNet class word) or category the notes do
  not mention, 3 to 30 words, not a copy of the full description, naming the subject or
  the category, no capitalised word that was not read; and when the notes were facts only
  (a classifier, not a VLM), no word outside the notes and a few caption words
  (``CAPTION_WORDS``), and no claim of text when none was read. Otherwise, or when the LLM
  was not asked for one (``models.llm_description``), ``short_description`` is used: a
  sentence a person would write from the same facts (subject, text shown, main colours).
- ``keywords``: kept only if every word occurs in the notes; the subject and the category
  come first, then the LLM's grounded keywords, then other facts; 3 to 5 of them.
- ``image_text`` is never generated: it is the OCR text as read (the vision stage already
  dropped unconfident text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from imgflow.models import categories
from imgflow.models.base import StructureInput

MIN_KEYWORDS, MAX_KEYWORDS = 3, 5
MIN_WORDS, MAX_WORDS = 3, 30
SUBJECT_MIN_SCORE = 0.10  # a label below this is not named as the subject
SUBJECT_SURE_SCORE = 0.30  # below this the short description says "probably" (as describe's "may show")
QUOTE_CHARS = 60  # read text quoted in the short description
NOTES_TEXT_CHARS = 300  # read text given to the LLM (the record keeps all of it)
ALTERNATIVE_MIN_SCORE = 0.10
COLOURS = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_QUOTED = re.compile(r"[\"“”]([^\"“”]+)[\"“”]")
# Words a caption may use besides the notes' own (when the notes are facts only).
CAPTION_WORDS = frozenset(
    (
        "a an the of and or in on with at to by its it is are this that which showing shows photo picture "
        "image close sign document text word words written reads reading saying says tones tone colours "
        "coloured colors colored probably possibly maybe some small large front number numbers letters"
    ).split()
)
# Words that claim text is visible.
TEXT_CLAIMS = frozenset({"text", "word", "words", "written", "reads", "reading", "saying", "says", "number", "numbers", "letters"})
_STOP = set("a an the of and or in on with for to it is its this that at by from as be are photo image picture".split())


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def norm(text: str) -> str:
    return " ".join((text or "").split())


@lru_cache(maxsize=1)
def object_words() -> frozenset[str]:
    """Every word of the 1000 ImageNet class names: words for things a description could
    claim to see."""
    from imgflow.models.embedded.efficientnet import imagenet_labels

    return frozenset(w for name in imagenet_labels() for w in words(name) if len(w) > 2) - _STOP


@dataclass(frozen=True)
class Facts:
    """What the models found for one image, as the structurer sees it."""

    subject: str  # the classifier's best label when it is sure enough; "" otherwise
    alternatives: list[str]
    candidates: list[str]  # categories, best first
    text: str  # OCR text as read
    colours: list[str]
    full: str  # the full description (vision stage)
    classified: bool = True  # a classifier gave labels (False: a VLM wrote ``full``)
    sure: bool = True  # the subject's score reached SUBJECT_SURE_SCORE ("probably" below it)

    @property
    def category(self) -> str:
        return self.candidates[0]

    def vocabulary(self) -> set[str]:
        """Words a keyword or the description may use."""
        return set(words(" ".join([self.subject, *self.alternatives, self.text, self.full]))) | set(self.candidates) | set(self.colours) | _STOP


def facts(item: StructureInput) -> Facts:
    labels = list(item.labels)
    scores = list(getattr(item, "scores", []) or [])
    if len(scores) != len(labels):
        scores = [1.0] + [ALTERNATIVE_MIN_SCORE] * (len(labels) - 1)  # rank order only
    cands = categories.candidates(labels, scores, item.image_text)
    pairs = [(n, p) for n, p in zip(labels, scores) if n != categories.TEXT_LABEL]
    labels, scores = [n for n, _ in pairs], [p for _, p in pairs]
    subject = labels[0] if labels and scores[0] >= SUBJECT_MIN_SCORE else ""
    alts = [n for n, p in zip(labels[1:], scores[1:]) if p >= ALTERNATIVE_MIN_SCORE][:2]
    if cands[0] in categories.TEXT_CATEGORIES and categories.has_text(item.image_text):
        subject, alts = "", []  # a sign or page: what the classifier saw in it is not the subject
    colours = [c for c in COLOURS if re.search(rf"\b{c}\b", item.description.lower()) and re.search(r"colours are|mostly", item.description)]
    sure = bool(subject) and scores[0] >= SUBJECT_SURE_SCORE
    return Facts(subject, alts, cands, item.image_text.strip(), colours, norm(item.description), bool(item.labels), sure)


def _quote(text: str, limit: int = QUOTE_CHARS) -> tuple[str, bool]:
    """The read text on one line, cut at a word boundary; and whether it was cut."""
    line = norm(text)
    if len(line) <= limit:
        return line, False
    return line[:limit].rsplit(" ", 1)[0], True


def short_description(f: Facts, category: str | None = None) -> str:
    """One short sentence from the facts alone, as a person would caption the image (used
    when the LLM's fails a rule): the subject ("probably" when the classifier was unsure),
    the text shown, the main colours. Worded unlike the full description, so the two
    columns differ; never a score or a number the image does not show."""
    category = category or f.category
    if category in categories.TEXT_CATEGORIES and f.text:
        noun = "sign" if category == "sign" else "document"
        quote, cut = _quote(f.text)
        return f'A {noun} that {"begins" if cut else "reads"} "{quote}".'
    people = re.match(r"A photo of ((?:a|two|three|a group of) (?:person|people))\b", f.full)
    if f.subject == categories.PERSON_LABEL and people:  # the describer counted the faces
        s = people.group(1)[0].upper() + people.group(1)[1:]
    elif f.subject:
        from imgflow.models.embedded.describe import with_article

        s = with_article(f.subject) if f.sure else "probably " + with_article(f.subject)
        s = s[0].upper() + s[1:]
    elif f.full and not f.classified:  # no classifier (GPU profile): the describer's first sentence
        first = re.split(r"(?<=[.!?])\s", f.full, maxsplit=1)[0]
        return " ".join(first.split()[:MAX_WORDS])
    else:
        s = "A photo with no clearly recognised subject"
    if f.text:
        quote, cut = _quote(f.text, 40)
        s += f' and the text "{quote}"' if not f.subject else f' with the text "{quote}"'
        s += " ..." if cut else ""
    if f.colours:
        s += f", in {' and '.join(f.colours)} tones"
    return s + "."


def description_problem(desc: str, f: Facts, category: str | None = None) -> str | None:
    """Why an LLM description breaks a grounding rule; None when it is fine."""
    category = category or f.category
    w = words(desc)
    if not MIN_WORDS <= len(w) <= MAX_WORDS:
        return f"{len(w)} words"
    if "%" in desc or "percent" in w:
        return "a percentage"
    shown = set(_NUMBER.findall(f.text))
    extra = [n for n in _NUMBER.findall(desc) if n not in shown]
    if extra:
        return f"numbers the image does not show: {extra}"
    text = norm(f.text).lower()
    quoted = [q for q in _QUOTED.findall(desc) if norm(q).lower() not in text]
    if quoted:
        return f"text that was not read: {quoted}"
    full = words(f.full)
    if len(w) >= 4 and any(full[i : i + len(w)] == w for i in range(len(full) - len(w) + 1)):
        return "a copy of (part of) the full description"
    vocab = f.vocabulary()
    invented = [x for x in w if x in object_words() and x not in vocab and x.rstrip("s") not in vocab]
    invented += [x for x in w if x in categories.CATEGORIES and x not in f.candidates and x not in vocab]
    if invented:
        return f"things no model reported: {sorted(set(invented))}"
    if f.classified:  # the notes were facts only: the caption may use their words and no others
        unknown = [x for x in w if x not in vocab and x not in CAPTION_WORDS and x.rstrip("s") not in vocab]
        if unknown:
            return f"words that are not in the notes: {sorted(set(unknown))}"
        if not f.text and set(w) & TEXT_CLAIMS:
            return "mentions text, but none was read"
    shouted = [x for x in re.findall(r"\b[A-Z]{2,}\b", desc) if x.lower() not in words(f.text)]
    if shouted:
        return f"text that was not read: {shouted}"
    anchors = set(words(f.subject)) | {category} | set(words(f.text))
    if f.subject and not anchors & set(w):
        return "names neither the subject nor the category"
    return None


def fact_keywords(f: Facts, category: str | None = None) -> list[str]:
    """Keywords from the facts alone, most important first."""
    out = []
    if f.subject:
        out.append(f.subject)
    out.append(category or f.category)
    out += f.alternatives
    out += [x for x in words(f.text) if len(x) > 2 and not x.isdigit()][:3]
    out += f.colours
    return out


def ground(answer: dict, item: StructureInput) -> dict:
    """The final record from the LLM's answer (description, category, keywords) and the facts."""
    f = facts(item)
    category = answer.get("category", "")  # asked for only when there were several candidates
    if category not in f.candidates:
        category = f.category
    desc = norm(answer.get("description", ""))  # absent: the LLM was not asked for one
    if not desc or description_problem(desc, f, category) is not None:
        desc = short_description(f, category)
    vocab = f.vocabulary() | {category}
    # Read text comes in capitals ("NO PARKING"); a keyword is a word, not a shout.
    proposed = [norm(k).lower() if norm(k).isupper() else norm(k) for k in answer.get("keywords", []) if norm(k)]
    grounded = [k for k in proposed if set(words(k)) and set(words(k)) <= vocab]
    facts_kw = fact_keywords(f, category)
    ordered = facts_kw[:2] + grounded + facts_kw[2:]
    keywords, seen = [], set()
    for k in ordered:
        if k.lower() not in seen:
            seen.add(k.lower())
            keywords.append(k)
    return {"description": desc, "category": category, "keywords": keywords[:MAX_KEYWORDS], "image_text": f.text}


def notes(item: StructureInput) -> str:
    """The user message: the facts, labelled, for the LLM to caption. Only the facts: given
    the composed full description too, the small models copied it instead of captioning
    (and it doubled the prompt). A VLM's description (no classifier) is the fact itself."""
    f = facts(item)
    lines = []
    if f.subject:
        lines.append(f"Subject: {f.subject}" + ("" if f.sure else " (not sure)"))
        if f.alternatives:  # for a person (a face), the classifier's labels are other things in view
            also = "Also seen: " if f.subject == categories.PERSON_LABEL else "Could also be: "
            lines.append(also + ", ".join(f.alternatives))
    if len(f.candidates) > 1:
        lines.append("Category, choose one of: " + ", ".join(f.candidates))
    else:
        lines.append(f"Category: {f.category}")
    if f.text:  # a page's worth would only slow the LLM down (or overflow its context)
        from imgflow.models.embedded.describe import quoted_text

        # " / " between lines: without it the LLM made keywords across them ("2041 ADULT SINGLE").
        lines.append(f'Text in the image: "{quoted_text(f.text, NOTES_TEXT_CHARS)}"')
    else:
        lines.append("Text in the image: none")
    if f.colours:
        lines.append("Colours: " + ", ".join(f.colours))
    if not f.classified and f.full:
        lines.append(f"Description: {f.full}")
    return "\n".join(lines)
