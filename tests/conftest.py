"""Shared fixtures: tiny BERT tokenizers, models and bundles built locally (no Hub, no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is never reachable from tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from guardmerge.testing import build_bundle, build_tokenizer, build_trigger_model, write_bundle

TOX = ["normal", "offensive", "hateful"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def trigger_bundle(tmp_path_factory, tokenizer):
    """Heads jailbreak [benign, jailbreak] (fires iff 'xyzzy' is in the window) + topic [3]."""
    model, heads = build_trigger_model(tokenizer)
    return write_bundle(tmp_path_factory.mktemp("bundles") / "trigger", model, tokenizer, heads)


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory, tokenizer):
    """Random weights, heads matching the shipped policies: jailbreak [2] + toxicity [3]."""
    return build_bundle(tmp_path_factory.mktemp("bundles") / "random",
                        {"jailbreak": ["benign", "jailbreak"], "toxicity": TOX},
                        tokenizer=tokenizer, seed=3)


@pytest.fixture(scope="session")
def trigger_classifier(trigger_bundle):
    from guardmerge import BundleClassifier

    return BundleClassifier.from_pretrained(trigger_bundle, batch_size=4)


@pytest.fixture(scope="session")
def random_classifier(random_bundle):
    from guardmerge import BundleClassifier

    return BundleClassifier.from_pretrained(random_bundle, batch_size=4)
