"""Strict readers and quality filters for what a teacher writes. Pure functions on text, no model.

- readers: `parse_analysis` (cues + 0-10 pole ratings), `parse_verdict` (a judge's YES/NO), both
  raising `ParseError`; `clean_response` (the reply alone, trimmed to a full sentence when cut off).
- filters: `response_flags` (one reply on its own: length, incoherent, ignores_user, unsafe) and
  `near_duplicates` (replies of one situation against each other). The flag names are the rejection
  reasons counted by the datagen stage and documented in its dataset card.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence


# --------------------------------------------------------------------------- reading teacher output


class ParseError(ValueError):
    """The teacher's answer does not follow the requested line format."""


@dataclass(frozen=True)
class Analysis:
    cues: list[str]
    ratings: dict[str, float]
    """Pole id -> activation in [0, 1] (the teacher's 0-10 rating / 10), in pole order."""


_MARKUP = re.compile(r"^[\s>*#`_-]*")  # bullets, bold and headings that small models add
_RATING = re.compile(r"^([a-z0-9_]+)\s*[*_`]*\s*[:=]\s*[*_`]*\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?[\s*_`.]*$", re.I)
_CUES = re.compile(r"^cues?\s*[*_`]*\s*:\s*(.*)$", re.I)


def parse_analysis(text: str, pole_ids: Sequence[str]) -> Analysis:
    """`CUES: a; b` then one `pole_id: N` (0-10) line per pole. Other lines are ignored; a missing,
    repeated-with-another-value or out-of-range pole, or no cues, raises ParseError."""
    cues: Optional[list[str]] = None
    ratings: dict[str, float] = {}
    known = {p.lower(): p for p in pole_ids}
    for raw in text.splitlines():
        line = _MARKUP.sub("", raw).strip()
        cue_match = _CUES.match(line)
        if cue_match and cues is None:
            cues = [c.strip(" .*") for c in re.split(r"[;\n]", cue_match.group(1)) if c.strip(" .*")]
            continue
        rating = _RATING.match(line)
        if rating and rating.group(1).lower() in known:
            _add_rating(ratings, known[rating.group(1).lower()], float(rating.group(2)))
    if not cues:
        raise ParseError("no 'CUES:' line with at least one cue")
    missing = [p for p in pole_ids if p not in ratings]
    if missing:
        raise ParseError(f"no rating for pole(s) {', '.join(missing)}")
    return Analysis(cues, {p: ratings[p] / 10.0 for p in pole_ids})


def _add_rating(ratings: dict[str, float], pole: str, value: float) -> None:
    if not 0 <= value <= 10:
        raise ParseError(f"rating {value:g} for '{pole}' is outside 0-10")
    if pole in ratings and ratings[pole] != value:
        raise ParseError(f"pole '{pole}' rated twice ({ratings[pole]:g} and {value:g})")
    ratings[pole] = value


def parse_verdict(text: str) -> bool:
    """A judge's YES or NO, as the first word; anything else raises ParseError."""
    match = re.match(r"^\W*(yes|no)\b", text.strip(), re.I)
    if not match:
        raise ParseError(f"expected YES or NO, got {text.strip()[:40]!r}")
    return match.group(1).lower() == "yes"


_LEAD_LABEL = re.compile(r"^\s*(assistant|response|reply|answer)\s*:\s*", re.I)
_TURN_MARKERS = re.compile(r"<\|im_(?:start|end)\|>|\n\s*(?:user|human|assistant)\s*:", re.I)


def clean_response(text: str, finished: bool = True) -> str:
    """The reply alone: no leading 'Assistant:' label, nothing after a new turn starts.

    A reply cut off by the token budget is trimmed to its last full sentence, when it has one,
    so training targets do not teach the experts to stop mid-sentence.
    """
    text = _TURN_MARKERS.split(text, maxsplit=1)[0]
    text = _LEAD_LABEL.sub("", text).strip()
    if not finished:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends:
            text = text[: ends[-1]]
    return text.strip()


# --------------------------------------------------------------------------- quality filters

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just let me
    more most my myself no nor not now of off on once only or other our ours ourselves out over own
    really same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves im ive youre dont cant thats its get got make
    like know think want need feel going one thing things something anything way well still even much
    many lot sure yes okay hi hello hey thanks thank please""".split()
)

# Stock phrases of replies that could answer any message (used with "no shared content word").
_GENERIC = re.compile(
    r"how (can|may) i (help|assist)|as an ai\b|i('m| am) (just )?an? (ai|language model)|"
    r"i (can(no|')t|am unable to) (help|assist)|thank(s| you) for (your|the) (message|question)|"
    r"i('m| am) here (to help|for you)|let me know if|feel free to|i understand( how you feel)?\b",
    re.I,
)

UNSAFE_PATTERNS: dict[str, re.Pattern] = {
    # Deliberately simple and documented in the dataset card: it catches blatant failures of a
    # teacher (encouraging self-harm, abuse, weapons), not subtle harm. Use the judge for more.
    "self_harm_encouragement": re.compile(
        r"\b(you should|go|just) (kill|hurt|harm) yourself\b|\bkys\b|no one would miss you|"
        r"\byou('d| would) be better off dead\b|\byou should (just )?(end|take) your (own )?life\b",
        re.I,
    ),
    "abuse": re.compile(r"\byou('re| are) (worthless|pathetic|a waste of (space|air)|subhuman)\b", re.I),
    "weapons": re.compile(r"\bhow to (make|build) (a |an )?(bomb|explosive|pipe bomb|nerve agent)", re.I),
    "medical_harm": re.compile(r"(?<!n't )(?<!not )\bstop taking (all )?(your|the) (medication|meds|insulin)\b", re.I),
}


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, apostrophes)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def _stem(word: str) -> str:
    # Crude suffix stripping so "worried"/"worry" and "deadlines"/"deadline" count as overlap.
    for suffix in ("ing", "ied", "ies", "ed", "es", "ly", "s", "y"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Stemmed words of 3+ letters that are not stopwords."""
    out = set()
    for w in words(text):
        w = w.replace("'", "")
        if len(w) >= 3 and w not in _STOPWORDS and not w.isdigit():
            out.add(_stem(w))
    return out


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (1.0 for two empty texts)."""
    sa, sb = set(words(a)), set(words(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def length_flag(text: str, min_words: int, max_words: int) -> Optional[str]:
    n = len(text.split())
    if n == 0:
        return "empty"
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    return None


def is_generic(response: str) -> bool:
    """A stock phrase, or fewer than 5 content words: a reply that could answer anything."""
    return bool(_GENERIC.search(response)) or len(content_words(response)) < 5


def ignores_user(response: str, user_text: str) -> bool:
    """No content word shared with what the user said, and generic."""
    return not (content_words(response) & content_words(user_text)) and is_generic(response)


def unsafe_category(text: str) -> Optional[str]:
    """The first UNSAFE_PATTERNS category that matches, or None."""
    return next((name for name, pattern in UNSAFE_PATTERNS.items() if pattern.search(text)), None)


def is_incoherent(text: str) -> bool:
    """Not English prose: almost no function words (word salad) or one phrase looping.

    Fluent English is ~40% function words; a random or broken model's output is well under 15%.
    Texts under 8 words are left to the length filter.
    """
    tokens = words(text)
    if len(tokens) < 8:
        return False
    function_share = sum(t.replace("'", "") in _STOPWORDS for t in tokens) / len(tokens)
    looping = len(tokens) >= 20 and len(set(tokens)) / len(tokens) < 0.3
    return function_share < 0.15 or looping


def response_flags(text: str, user_text: str, min_words: int, max_words: int) -> list[str]:
    """Rejection reasons of one response on its own: empty/too_short/too_long, incoherent, ignores_user, unsafe."""
    size = length_flag(text, min_words, max_words)
    if size == "empty":
        return [size]
    flags = [size] if size else []
    if is_incoherent(text):
        flags.append("incoherent")
    if ignores_user(text, user_text):
        flags.append("ignores_user")
    if unsafe_category(text):
        flags.append("unsafe")
    return flags


def near_duplicates(responses: dict[str, str], threshold: float) -> set[str]:
    """Keys of non-empty responses whose token-set Jaccard with another is >= threshold (both of a pair)."""
    keys = [k for k, v in responses.items() if v.strip()]
    dup: set[str] = set()
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if jaccard(responses[a], responses[b]) >= threshold:
                dup.update((a, b))
    return dup
