"""Slow, obviously correct reference of normalisation spec v1 (tests only)."""
import unicodedata

import xxhash

FOLDED = {"Pd", "Ps", "Pe", "Pi", "Pf", "Po"}
KEPT = set("#%&*@/\\§¶†‡‰‱′″‴")
APOSTROPHES = {"'", "\u2019"}


def private_use(cp: int) -> bool:
    return 0xE000 <= cp <= 0xF8FF or cp >= 0xF0000


def removed(ch: str) -> bool:
    return not ch.isspace() and not ch.isprintable() and not private_use(ord(ch))


def folded(ch: str) -> bool:
    if ch.isspace() or ch.isalnum() or removed(ch):
        return False
    return unicodedata.category(ch) in FOLDED and ch not in KEPT


def normalize(text: str, fillers=()) -> str:
    if text.isascii():
        t = text.lower()
    else:
        t = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    chars = []
    for i, ch in enumerate(t):
        before = t[i - 1] if i > 0 else ""
        after = t[i + 1] if i + 1 < len(t) else ""
        if ch.isspace():
            chars.append(" ")
        elif removed(ch):
            continue
        elif folded(ch):
            if after.isdigit() or (before.isdigit() and after.isalnum()):
                chars.append(ch)
            elif ch in APOSTROPHES and before.isalnum() and after.isalnum():
                continue
            else:
                chars.append(" ")
        else:
            chars.append(ch)
    return " ".join(w for w in "".join(chars).split(" ") if w and w not in fillers)


def spec_seed(fillers) -> int:
    descriptor = "llm-sidecar/normalize/1\x1funicode=%s\x1ffillers=%s" % (
        unicodedata.unidata_version, "\x1e".join(sorted(set(fillers))))
    return xxhash.xxh3_64_intdigest(descriptor.encode())


def fingerprint(text: str, fillers=()) -> tuple[str, bytes]:
    norm = normalize(text, fillers)
    return norm, xxhash.xxh3_128_digest(norm.encode("utf-8"), seed=spec_seed(fillers))
