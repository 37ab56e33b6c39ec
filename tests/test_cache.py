"""The history cache: each turn of a conversation costs only its new text."""

from __future__ import annotations

import pytest

from guardmerge import BundleClassifier, Guard, Policy
from guardmerge.guard import CachedClassifier
from guardmerge.testing import random_text

POLICY = Policy.from_yaml("""
input:
  roles: [user, assistant]
  rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]
""")


def _conversation(turns: int):
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": random_text(30, seed=t)})
        yield list(msgs)
        msgs.append({"role": "assistant", "content": random_text(40, seed=1000 + t)})


def _run(bundle, cache_size: int):
    clf = BundleClassifier.from_pretrained(bundle, batch_size=8)
    guard = Guard(clf, POLICY, cache_size=cache_size)
    verdicts = [guard.check(msgs) for msgs in _conversation(20)]
    return clf.stats, verdicts


def test_cache_makes_each_turn_cost_only_its_new_text(trigger_bundle):
    cached, v1 = _run(trigger_bundle, 1024)
    uncached, v2 = _run(trigger_bundle, 0)
    # turn t sends 2t + 1 messages; new are the last reply and the new prompt (1 + 19 * 2 texts)
    assert cached.windows == 39 and cached.forward_passes == 20
    assert uncached.windows == sum(2 * t + 1 for t in range(20)) == 400
    assert uncached.forward_passes == sum((2 * t + 1 + 7) // 8 for t in range(20)) == 60
    assert [v.action for v in v1] == [v.action for v in v2]


def test_cache_is_bounded_and_returns_the_same_scores(trigger_classifier):
    cache = CachedClassifier(trigger_classifier, maxsize=2)
    a = cache.classify(["hello world", "the cat sat"])
    b = cache.classify(["the cat sat", "hello world"])
    assert cache.hits == 2 and cache.misses == 2
    assert b[0].heads["topic"].scores == a[1].heads["topic"].scores
    assert b[0].text_index == 0
    cache.classify(["a new text"])
    assert len(cache._cache) == 2
    with pytest.raises(ValueError):
        CachedClassifier(trigger_classifier, maxsize=0)
