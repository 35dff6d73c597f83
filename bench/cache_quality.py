"""Semantic-cache quality on labelled question pairs (``python -m bench cache --pairs F``).

The pairs file holds JSON lines ``{"a": ..., "b": ..., "label": 1 | 0}``: label 1 = the
two questions ask the same thing (serving one's answer for the other is right), 0 = they
differ (a hit would be a wrong answer). An audit file beside it (``audit_neg.jsonl``, rows
``{"index": line number, "verdict": "same" | "different" | "unsure"}``) corrects labels:
``same`` counts as 1, ``unsure`` rows are left out. The data is read where it lies and
never copied.

For each embedder the daemon offers (``minilm``, ``lexical``) and each verifier mode
(``off``, ``cheap``, ``full``) it reports, with the daemon's own code (``sidecar.cache.embed``,
``sidecar.cache.verify``): recall (share of label-1 pairs served) at <= 1% false hits (share
of label-0 pairs served) and the threshold that needs, chosen in this run on these pairs
(so optimistic), and recall and false-hit rate at the daemon's configured default
threshold (``sidecar.cache.semantic.DEFAULT_THRESHOLDS``, fixed in advance). A pair is served when
its cosine similarity reaches the threshold and the verifier finds no reason against it
(question ``a`` asked, ``b`` cached).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from sidecar.cache.semantic import DEFAULT_THRESHOLDS
from sidecar.cache.embed import make_embedder
from sidecar.text.normalize import Normalizer
from sidecar.cache.verify import Mode, check

MAX_FALSE_HIT_RATE = 0.01
TARGET_FACTOR = 2.0  # recall with the verifier vs cosine alone, same embedder, same run
TARGET_RECALL = 0.30
STRETCH_RECALL = 0.50


def load_pairs(path: Path, audit: Path | None, limit: int = 0) -> list[tuple[str, str, int]]:
    """``(a, b, label)`` with the audit's corrections applied (``unsure`` dropped)."""
    verdicts = {}
    if audit is not None and audit.exists():
        for line in audit.read_text().splitlines():
            row = json.loads(line)
            verdicts[int(row["index"])] = row["verdict"]
    pairs = []
    for index, line in enumerate(path.read_text().splitlines()):
        if limit and index >= limit:
            break
        row = json.loads(line)
        label = int(row["label"])
        verdict = verdicts.get(index)
        if verdict == "unsure":
            continue
        if verdict == "same":
            label = 1
        pairs.append((row["a"], row["b"], label))
    return pairs


def threshold_at(cosines: np.ndarray, labels: np.ndarray, allowed: np.ndarray) -> tuple[float, float, float]:
    """The lowest threshold serving at most 1% of negatives among ``allowed`` pairs;
    returns ``(threshold, recall, false-hit rate)``."""
    negatives = int((labels == 0).sum())
    budget = math.floor(MAX_FALSE_HIT_RATE * negatives)
    neg = np.sort(cosines[(labels == 0) & allowed])[::-1]
    # serving every pair above the (budget+1)-th highest negative keeps <= budget
    threshold = float(np.nextafter(neg[budget], np.float32(2))) if len(neg) > budget else -1.0
    return (threshold, *rates(cosines, labels, allowed, threshold))


def rates(cosines: np.ndarray, labels: np.ndarray, allowed: np.ndarray,
          threshold: float) -> tuple[float, float]:
    served = allowed & (cosines >= threshold)
    recall = float((served & (labels == 1)).sum() / max(1, (labels == 1).sum()))
    fpr = float((served & (labels == 0)).sum() / max(1, (labels == 0).sum()))
    return recall, fpr


def measure(pairs_path: Path, audit_path: Path | None, quick: bool) -> dict:
    pairs = load_pairs(pairs_path, audit_path, limit=600 if quick else 0)
    labels = np.array([p[2] for p in pairs])
    texts = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    where = {t: i for i, t in enumerate(texts)}
    verdicts = {mode: np.array([not check(a, b, mode) for a, b, _ in pairs])
                for mode in Mode}
    t0 = time.perf_counter()
    reasons_full = [check(a, b, Mode.FULL) for a, b, _ in pairs]
    verify_us = (time.perf_counter() - t0) / len(pairs) * 1e6
    out: dict = {"pairs": len(pairs), "positives": int((labels == 1).sum()),
                 "negatives": int((labels == 0).sum()), "verifier_us_per_pair": verify_us,
                 "embedders": {}}
    for kind in ("minilm", "lexical"):
        embedder = make_embedder(kind, Normalizer())
        start = time.perf_counter()
        vectors = embedder.embed(texts)
        per_text_ms = (time.perf_counter() - start) / len(texts) * 1e3
        a = vectors[[where[p[0]] for p in pairs]]
        b = vectors[[where[p[1]] for p in pairs]]
        cosines = np.einsum("ij,ij->i", a, b)
        rows = {}
        for mode in Mode:
            threshold, recall, fpr = threshold_at(cosines, labels, verdicts[mode])
            default = DEFAULT_THRESHOLDS[(kind, mode.value)]
            d_recall, d_fpr = rates(cosines, labels, verdicts[mode], default)
            rows[mode.value] = {"threshold": threshold, "recall": recall, "false_hit_rate": fpr,
                                "default_threshold": default, "default_recall": d_recall,
                                "default_false_hit_rate": d_fpr}
        false_hits = []
        default = DEFAULT_THRESHOLDS[(kind, "full")]
        for i in np.argsort(-cosines):
            if labels[i] == 0 and verdicts[Mode.FULL][i] and cosines[i] >= default:
                false_hits.append({"cosine": round(float(cosines[i]), 4), "a": pairs[i][0],
                                   "b": pairs[i][1]})
        refused_right = sum(1 for i in range(len(pairs)) if labels[i] == 0
                            and cosines[i] >= default and reasons_full[i])
        out["embedders"][kind] = {"embed_ms_per_text": per_text_ms, "modes": rows,
                                  "false_hits_at_default": false_hits[:10],
                                  "false_hit_count_at_default": len(false_hits),
                                  "negatives_refused_by_verifier": refused_right}
    return out


def targets(quality: dict) -> list[dict]:
    """Recall with the verifier at <= 1% false hits against cosine alone (same embedder,
    same run), and the absolute goals."""
    minilm = quality["embedders"]["minilm"]["modes"]
    alone, full = minilm["off"]["recall"], minilm["full"]["recall"]
    ratio = full / alone if alone else math.inf
    return [
        {"target": f"minilm + verifier recall >= {TARGET_FACTOR:g}x cosine alone at <= 1% "
                   "false hits", "value": ratio, "pass": ratio >= TARGET_FACTOR,
         "measured": f"{full:.1%} vs {alone:.1%} = {ratio:.2f}x"},
        {"target": f"minilm + verifier recall >= {TARGET_RECALL:.0%} (stretch "
                   f"{STRETCH_RECALL:.0%})", "value": full, "pass": full >= TARGET_RECALL,
         "measured": f"{full:.1%}" + (" (stretch met)" if full >= STRETCH_RECALL else "")},
    ]


def print_quality(quality: dict) -> None:
    print(f"\nquality: {quality['pairs']} pairs ({quality['positives']} same, "
          f"{quality['negatives']} different, audit applied); served = cosine >= threshold "
          "and no verifier objection; verifier "
          f"{quality['verifier_us_per_pair']:.0f} us per pair")
    print(f"{'embedder':<9}{'verifier':<9}{'thr@1%':>8}{'recall':>8}{'fhr':>7}"
          f"{'default':>9}{'recall':>8}{'fhr':>7}")
    for kind, e in quality["embedders"].items():
        for mode, r in e["modes"].items():
            print(f"{kind:<9}{mode:<9}{r['threshold']:>8.4f}{r['recall']:>8.1%}"
                  f"{r['false_hit_rate']:>7.2%}{r['default_threshold']:>9.3f}"
                  f"{r['default_recall']:>8.1%}{r['default_false_hit_rate']:>7.2%}")
        print(f"{'':<9}embedding {e['embed_ms_per_text']:.2f} ms per text; at the default "
              f"threshold with the full verifier: {e['false_hit_count_at_default']} false hits, "
              f"{e['negatives_refused_by_verifier']} negatives refused by the verifier")
    hits = quality["embedders"]["minilm"]["false_hits_at_default"]
    if hits:
        print("\nremaining false hits (minilm, full verifier, default threshold), highest "
              "cosine first:")
        for h in hits:
            print(f"  {h['cosine']:.4f}  {h['a']!r}  vs  {h['b']!r}")
