"""The semantic cache tier: the pair verifier on hand-written near-misses, the lexical
embedder, and paraphrase hits, refusals, scopes and client vectors through a real daemon
running the default embedder (all-MiniLM-L6-v2 from its PyPI package)."""
import time

import numpy as np
import pytest

from sidecar import Client
from sidecar.cache.embed import Lexical, MiniLM, unit_vector
from sidecar.errors import InvalidValue
from sidecar.text.normalize import Normalizer
from sidecar.cache.verify import Mode, check

# --- the verifier -------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,reason", [
    ("What was the population of Canada in 2020?", "What was the population of Canada in 2021?",
     "number_substituted"),
    ("How many calories are in an egg?", "How many calories are in 2 eggs?", "number_added"),
    ("What is the capital of Australia?", "What is the capital of Austria?", "name_substituted"),
    ("Is Python good for web development?", "Is Python or Go good for web development?",
     "name_added"),
    ("Why is the sky blue?", "When is the sky blue?", "question_word"),
    ("Is it a good time to buy Tesla stock?", "Is it a good time to sell Tesla stock?",
     "antonym_or_negated_word"),
    ("Why are people unhappy at work?", "Why are people happy at work?",
     "antonym_or_negated_word"),
    ("What does this code print?", "What does the code print?", "points_to_unshown_content"),
    ("Can you explain the chart below?", "Can you explain the chart?", "points_to_unshown_content"),
])
def test_verifier_refuses_near_misses(a, b, reason):
    assert reason in check(a, b)
    assert reason in check(b, a)


@pytest.mark.parametrize("a,b", [
    ("How can I improve my English writing skills?",
     "What are some ways to improve my English writing skills?"),
    ("How do I make my dog stop barking at night?", "How can I stop my dog from barking at night?"),
    ("What are the health benefits of green tea?", "Which benefits does green tea have?"),
    ("Where can I buy cheap flights to Paris?", "Where do I buy cheap flights to Paris?"),
    ("How old is the universe?", "what is the age of the universe"),
])
def test_verifier_passes_paraphrases(a, b):
    assert check(a, b) == []


def test_verifier_modes():
    a, b = "Is it a good time to buy gold?", "Is it a good time to sell gold?"
    assert check(a, b, Mode.FULL) == ["antonym_or_negated_word"]
    assert check(a, b, Mode.CHEAP) == []  # no word lists
    assert check("In 2020?", "In 2021?", Mode.OFF) == []


def test_numbers_are_whole_words():
    assert check("What happened in 2016?", "What happened in 2016 exactly?") == []
    assert "number_added" in check("What happened in 2016?", "What happened in 1 2016?")


# --- embedders ------------------------------------------------------------------------------


def test_lexical_embedder_is_deterministic_and_near_duplicate_only():
    e = Lexical(Normalizer())
    v = e.embed(["How do I reset my router?", "how do i reset my router", "Best pizza in Rome",
                 ""])
    assert v.dtype == np.float32 and v.shape == (4, e.dim) and v.flags.c_contiguous
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert not v[3].any()  # no text: the zero vector
    assert float(v[0] @ v[1]) > 0.999  # the same after normalisation
    assert float(v[0] @ v[2]) < 0.3
    assert np.array_equal(e.embed(["How do I reset my router?"])[0], v[0])


def test_minilm_embeds_meaning():
    m = MiniLM()
    v = m.embed(["How do I reset my router password?",
                 "How can I reset the password of my router?",
                 "What is the best pizza in Rome?"])
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > 0.95 > 0.5 > float(v[0] @ v[2])


def test_client_vectors_are_checked_and_normalised():
    v = unit_vector([3.0, 4.0])
    assert np.allclose(v, [0.6, 0.8])
    for bad, dim in (([0.0, 0.0], 0), ([1.0, float("nan")], 0), ([1.0, 2.0], 3), ([], 0)):
        with pytest.raises(InvalidValue):
            unit_vector(bad, dim)


# --- through the daemon ---------------------------------------------------------------------


def _eventually_hit(c: Client, timeout: float = 10.0, **fields):
    """The semantic write is applied off the request path: poll until it lands."""
    deadline = time.monotonic() + timeout
    while True:
        reply = c.cache_get(**fields)
        if reply.hit or time.monotonic() > deadline:
            return reply
        time.sleep(0.02)


def test_paraphrases_hit_near_misses_are_refused(start_daemon):
    d = start_daemon()
    d.wait_semantic_ready()
    with Client(d.path) as c:
        assert c.stats().cache.threshold == 0.92
        for q, a in (("How do I reset my router password?", "hold reset for 10 s"),
                     ("Is it a good time to buy Tesla stock?", "no advice"),
                     ("What does this code print?", "it depends")):
            assert c.cache_put(a, text=q, model="gpt-4o", kind="factual_qa").tier == "semantic"
        hit = _eventually_hit(c, text="How can I reset the password of my router?",
                              model="gpt-4o")
        assert hit.hit and hit.tier == "semantic" and hit.value() == "hold reset for 10 s"
        assert 0.92 <= hit.similarity < 1.0 and hit.verdict == "verified"
        assert hit.query == "How do I reset my router password?"
        sell = c.cache_get(text="Is it a good time to sell Tesla stock?", model="gpt-4o")
        assert not sell.hit and sell.reason == "refused"
        assert sell.verdict == "antonym_or_negated_word" and sell.similarity >= 0.92
        shown = c.cache_get(text="What does the code print?", model="gpt-4o")
        assert not shown.hit and "points_to_unshown_content" in shown.verdict
        far = c.cache_get(text="What is the best pizza in Rome?", model="gpt-4o")
        assert not far.hit and far.reason == "miss"
        strict = c.cache_get(text="How can I reset the password of my router?", model="gpt-4o",
                             threshold=0.999)
        assert not strict.hit  # a stricter threshold is honoured
        other_model = c.cache_get(text="How can I reset the password of my router?",
                                  model="gpt-4o-mini")
        assert not other_model.hit
        other_tenant = c.cache_get(text="How can I reset the password of my router?",
                                   model="gpt-4o", namespace="tenant-b")
        assert not other_tenant.hit
        with_system = c.cache_get(model="gpt-4o", messages=[
            {"role": "system", "content": "Answer as a pirate."},
            {"role": "user", "content": "How can I reset the password of my router?"}])
        assert not with_system.hit
        sem = c.stats().cache.tiers["semantic"]
        assert sem.entries == 3 and sem.hits == 1 and sem.verifier_refusals == 2
    assert d.stop() == 0


def test_pending_counts_a_write_until_it_is_searchable(start_daemon):
    d = start_daemon()
    d.wait_semantic_ready()
    with Client(d.path) as c:
        c.cache_put("42", text="What is the answer to everything?", kind="factual_qa")
        while c.stats().cache.semantic_pending:
            time.sleep(0.005)
        assert c.cache_get(text="What's the answer to everything?").hit  # no polling
    assert d.stop() == 0


def test_exact_kinds_never_match_paraphrases(start_daemon):
    d = start_daemon()
    d.wait_semantic_ready()
    with Client(d.path) as c:
        c.cache_put("def f(): pass", text="Write a Python function that does nothing",
                    kind="code")
        time.sleep(0.2)
        assert not c.cache_get(text="Write a Python function doing nothing").hit
        assert c.stats().cache.tiers["semantic"].entries == 0
    assert d.stop() == 0


def test_client_vectors_and_restart(start_daemon):
    config = "[cache.semantic]\nclient_dim = 4\n"
    d = start_daemon(config)
    with Client(d.path) as c:
        c.cache_put("A", text="my question", kind="factual_qa", vector=[1, 0, 0, 0.1])
        hit = _eventually_hit(c, text="another wording", vector=[1, 0, 0, 0.12])
        assert hit.hit and hit.tier == "semantic" and hit.value() == "A"
        with pytest.raises(InvalidValue, match="4"):
            c.cache_get(text="q", vector=[1, 0, 0])
        c.cache_put("B", text="How do I reset my router password?", kind="factual_qa")
    assert d.stop() == 0
    d2 = start_daemon(config, socket_path=d.path)
    d2.wait_semantic_ready()
    with Client(d2.path) as c:  # entries come back from the snapshot and are indexed again
        assert _eventually_hit(c, text="another wording", vector=[1, 0, 0, 0.12]).hit
        again = _eventually_hit(c, text="How can I reset the password of my router?")
        assert again.hit and again.value() == "B"
        c.cache_invalidate(all=True)
        assert not c.cache_get(text="How can I reset the password of my router?").hit
    assert d2.stop() == 0
