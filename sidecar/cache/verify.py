"""The semantic cache's pair verifier: reads a new question and a cached one together and
names every way they may ask different things.

A semantic hit needs the similarity threshold AND no reason from ``check``. The checks are
rules on words, no fitted weights, chosen by measurement on labelled question pairs
(``python -m bench cache --pairs FILE`` reproduces the figures): with all-MiniLM-L6-v2 at
<= 1% false hits they lift the paraphrases served from ~19% (cosine alone) to ~33%
(5-fold cross-validated). What each check looks at:

- numbers (digits, decimals, number words except "one") and names (capitalised words not
  at the start of a sentence, words mixing letters and digits such as "i7"): a value on
  one side that is absent on the other is ``number_added``/``name_added``; values absent
  both ways are ``*_substituted``. Whole words are compared, so "1" never matches "2016";
- the question word's class (who / how / why / when / where / yes-no; "what", "which" and
  no question word are compatible with anything): ``question_word``;
- a question pointing at content that is not part of it ("this code", "the text below"):
  ``points_to_unshown_content``; its answer depends on what was shown;
- an antonym or a negating prefix between the words only one side has (buy/sell,
  shortest/longest, biased/unbiased): ``antonym_or_negated_word``.

``Mode.CHEAP`` runs only the first two (no word lists). The lists are general English; some
entries were chosen after reading hard negatives of the dev pairs, so expect real-world
recall between the cheap mode's (~25%) and the full mode's (~33%) measured figures.
"""
from __future__ import annotations

import enum
import re

__all__ = ["Mode", "Verifier", "check"]


class Mode(enum.Enum):
    FULL = "full"  # all checks (default)
    CHEAP = "cheap"  # numbers, names and question words only
    OFF = "off"  # no verification: the threshold alone decides


_WORD = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_DIGITS = re.compile(r"\d+")
_CODE = re.compile(r"[A-Za-z]\d|\d[A-Za-z]")

_NUMBER_WORDS = frozenset("""
    zero two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy
    eighty ninety hundred thousand million billion trillion first second third fourth
    fifth sixth seventh eighth ninth tenth half double single
""".split())  # "one" is left out: mostly a pronoun

_QUESTION_CLASS = {"what": "what", "which": "what", "whats": "what", "who": "who",
                   "whom": "who", "whose": "who", "how": "how", "why": "why", "when": "when",
                   "where": "where"}
_QUESTION_CLASS.update(dict.fromkeys(
    "is are am was were can could do does did should would will shall has have had may "
    "might".split(), "yes_no"))
_ANY_CLASS = frozenset(("what", "other"))

_ANTONYM_PAIRS = """
    buy/sell short/long shortest/longest shorter/longer most/least most/less more/less
    best/worst better/worse good/bad high/low higher/lower highest/lowest before/after
    increase/decrease increase/reduce positive/negative pro/con advantage/disadvantage
    rich/poor big/small biggest/smallest large/small largest/smallest hot/cold fast/slow
    old/new young/old male/female man/woman men/women boy/girl boyfriend/girlfriend
    husband/wife first/last start/stop win/lose love/hate true/false easy/hard
    easy/difficult cheap/expensive import/export up/down input/output left/right
    north/south east/west top/bottom open/close push/pull send/receive give/take
    lend/borrow teach/learn gain/lose weight/height maximum/minimum max/min
    upload/download past/future strength/weakness success/failure happy/sad day/night
    summer/winter inside/outside with/without always/never everyone/nobody all/none
    fiction/nonfiction mother/father mom/dad son/daughter brother/sister
    employer/employee student/teacher introvert/extrovert democrat/republican
    liberal/conservative add/remove enable/disable install/uninstall join/leave
    enter/exit accept/reject
"""
_ANTONYMS: dict[str, set[str]] = {}
for _pair in _ANTONYM_PAIRS.split():
    _a, _b = _pair.split("/")
    _ANTONYMS.setdefault(_a, set()).add(_b)
    _ANTONYMS.setdefault(_b, set()).add(_a)
_NEGATING_PREFIXES = ("un", "non", "in", "im", "ir", "il", "dis", "anti")

_POINTER_WORDS = frozenset(("below", "above", "attached", "following", "aforementioned"))
_POINTER_NOUNS = frozenset("""
    code program question equation problem picture image photo pic video song sentence
    paragraph text graph circuit function diagram puzzle riddle poem passage statement
    integral answer
""".split())
_DEMONSTRATIVES = ("this", "these", "that")
_TRAILING_POINTERS = ("this", "that", "these", "those", "it")


def _lemma(word: str) -> str:
    """Lower case without a possessive or plural ending (a crude stemmer: enough to see
    "phones" and "phone" as one word)."""
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


class _Facts:
    """What the checks need of one question."""

    __slots__ = ("lower", "lemmas", "numbers", "names", "question", "pointer")

    def __init__(self, text: str) -> None:
        words = _WORD.findall(text)
        lower = [w.lower() for w in words]
        self.lower = set(lower)
        self.lemmas = {_lemma(w) for w in words}
        self.numbers = {w for w in lower if _NUMBER.fullmatch(w) or w in _NUMBER_WORDS}
        self.numbers.update(_DIGITS.findall(text))
        names = {_lemma(w) for w in words if _CODE.search(w)}
        for k in range(1, len(words)):
            w = words[k]
            if w[:1].isupper() and w != "I" and words[k - 1] not in (".", "?", "!"):
                names.add(_lemma(w))
        self.names = names
        self.question = next((_QUESTION_CLASS[w] for w in lower[:4] if w in _QUESTION_CLASS),
                             "other")
        self.pointer = self._points_elsewhere(lower)

    @staticmethod
    def _points_elsewhere(lower: list[str]) -> bool:
        if any(w in _POINTER_WORDS for w in lower):
            return True
        if any(w in _DEMONSTRATIVES and nxt in _POINTER_NOUNS for w, nxt in zip(lower, lower[1:])):
            return True
        words = [w for w in lower if _WORD.fullmatch(w) and w[0].isalnum()]
        return bool(words) and words[-1] in _TRAILING_POINTERS and len(words) <= 8

    def missing(self, values: set[str]) -> set[str]:
        """Those of ``values`` that are not a word (or a word's lemma) here."""
        return {v for v in values if v not in self.lemmas and v not in self.lower}


def _differ(kind: str, a: _Facts, b: _Facts) -> str:
    """"<kind>_substituted", "<kind>_added" or "" for the numbers or names of a and b."""
    only_a = b.missing(getattr(a, kind + "s"))
    only_b = a.missing(getattr(b, kind + "s"))
    if only_a and only_b:
        return f"{kind}_substituted"
    if only_a or only_b:
        return f"{kind}_added"
    return ""


def _negated(word: str, others: set[str]) -> bool:
    return any(word.startswith(p) and word[len(p):].lstrip("-") in others
               for p in _NEGATING_PREFIXES)


def check(a: str, b: str, mode: Mode = Mode.FULL) -> list[str]:
    """Every reason why questions ``a`` and ``b`` may differ; empty: they may share an
    answer (as far as these rules see)."""
    if mode is Mode.OFF:
        return []
    fa, fb = _Facts(a), _Facts(b)
    reasons = [r for r in (_differ("number", fa, fb), _differ("name", fa, fb)) if r]
    if fa.question != fb.question and not {fa.question, fb.question} & _ANY_CLASS:
        reasons.append("question_word")
    if mode is Mode.FULL:
        if fa.pointer or fb.pointer:
            reasons.append("points_to_unshown_content")
        only_a, only_b = fa.lemmas - fb.lemmas, fb.lemmas - fa.lemmas
        if (any(_ANTONYMS.get(w, set()) & only_b for w in only_a)
                or any(_negated(w, only_b) for w in only_a)
                or any(_negated(w, only_a) for w in only_b)):
            reasons.append("antonym_or_negated_word")
    return reasons


class Verifier:
    """``check`` at a configured mode (what the cache holds)."""

    __slots__ = ("mode",)

    def __init__(self, mode: Mode = Mode.FULL) -> None:
        self.mode = mode

    def __call__(self, a: str, b: str) -> list[str]:
        return check(a, b, self.mode)
