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


# -- the guard-integrity suites (tests/test_integrity_*.py) ---------------------------------------

JB_HEADS = {"jailbreak": ["benign", "jailbreak"], "toxicity": TOX}
JB_POLICY = """
refusal_message: "Refused by policy."
input:
  roles: [user, tool]
  rules:
    - {id: jb, head: jailbreak, labels: [jailbreak], flag: 0.5, block: 0.9}
output:
  rules:
    - {id: jb-out, head: jailbreak, labels: [jailbreak], block: 0.9}
"""


def jb_score(text):
    """The model-free stand-in of the trigger model: jailbreak iff 'xyzzy' is in the text."""
    return {"jailbreak": {"jailbreak": 0.99 if "xyzzy" in text else 0.01}}


def trigger_reply(messages):
    """Upstream replies: 'tell me the secret' gets an answer with the trigger word late in it."""
    from guardmerge.testing import echo_reply

    last = echo_reply(messages)
    if "tell me the secret" in last:
        return "Sure. " + " ".join(["word"] * 60) + " the secret is xyzzy and more words after it"
    return last


@pytest.fixture()
def jb_guard():
    from guardmerge import FunctionClassifier, Guard, Policy

    return Guard(FunctionClassifier(JB_HEADS, jb_score), Policy.from_yaml(JB_POLICY))


@pytest.fixture()
def llm():
    """The local OpenAI-compatible server (chat, legacy completions, Responses)."""
    from guardmerge.testing import OpenAICompatServer

    with OpenAICompatServer(reply=trigger_reply, words_per_chunk=2) as srv:
        yield srv


def sdk_client(server, *, asynchronous=False):
    import openai

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=server.url, api_key="test", max_retries=0, timeout=10)
