"""Guard integrity, 3, 4 and 9: no silent pass on NaN, on malformed results or on a hang.

A guard that fails fails closed (``on_error``, block by default): NaN / inf scores, a bundle
with non-finite weights (refused at load), recipes and policies with ``.nan`` / ``.inf``, a
merge that would write a non-finite tensor, a classifier that returns fewer results or a
missing head, and a check that outlasts its timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import threading

import pytest
import torch
from conftest import JB_HEADS, JB_POLICY, jb_score, sdk_client
from safetensors.torch import load_file, save_file

from guardmerge import (BundleClassifier, Classifier, ClassifierError, FunctionClassifier, Guard,
                        MergeError, ModelLoadError, Policy, PolicyError, PromptBlockedError,
                        RecipeError, ResponseBlockedError, guard_client)
from guardmerge.cli import main
from guardmerge.merge import MergeRecipe, merge
from guardmerge.testing import build_base_folder, build_classifier_folder


def _policy(prefix: str = "") -> Policy:
    return Policy.from_yaml(prefix + JB_POLICY)


class Tampered(Classifier):
    """A real (function) classifier whose results ``tamper(texts, results)`` may spoil."""

    def __init__(self, tamper):
        self.inner = FunctionClassifier(JB_HEADS, jb_score)
        self.heads = self.inner.heads
        self.name = "tampered"
        self.tamper = tamper

    def classify(self, texts, *, max_tokens=None):
        return self.tamper(list(texts), self.inner.classify(texts, max_tokens=max_tokens))


def _nan_scores(texts, results):
    for r in results:
        r.heads["jailbreak"].scores["jailbreak"] = float("nan")
    return results


def _drop_head(texts, results):
    for r in results:
        r.heads.pop("jailbreak")
    return results


def _set(label_value):
    def tamper(texts, results):
        for r in results:
            r.heads["jailbreak"].scores["benign"] = label_value
        return results
    return tamper


def _extra_label(texts, results):
    for r in results:
        r.heads["jailbreak"].scores["evil"] = 0.0
    return results


def _bad_window(texts, results):
    for r in results:
        r.heads["jailbreak"].windows["jailbreak"] = 7
    return results


BROKEN = {
    "NaN score": _nan_scores,
    "inf score": _set(float("inf")),
    "score above 1": _set(1.5),
    "negative score": _set(-0.2),
    "string score": _set("0.1"),
    "fewer results than texts": lambda texts, results: results[:-1],
    "no results": lambda texts, results: [],
    "not a list": lambda texts, results: None,
    "missing head": _drop_head,
    "unknown label": _extra_label,
    "window out of range": _bad_window,
    "not TextScores": lambda texts, results: [dataclasses.asdict(r) for r in results],
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_malformed_classifier_result_is_a_guard_failure_never_a_pass(name):
    guard = Guard(Tampered(BROKEN[name]), _policy())
    v = guard.check([{"role": "user", "content": "hello"}, {"role": "user", "content": "there"}])
    assert v.blocked and [f.kind for f in v.findings] == ["error"], name
    assert "ClassifierError" in v.findings[0].detail
    flagged = Guard(Tampered(BROKEN[name]), _policy("on_error: flag\n")).check_text("hello")
    assert flagged.flagged  # the policy's choice, still never a silent pass


def test_a_bad_result_is_never_cached():
    calls = []

    def tamper(texts, results):
        calls.append(texts)
        return _nan_scores(texts, results) if len(calls) == 1 else results

    guard = Guard(Tampered(tamper), _policy())
    assert guard.check_text("hello").blocked
    assert guard.check_text("hello").passed and len(calls) == 2


def test_a_malformed_result_mid_stream_follows_on_error_and_leaks_nothing(llm):
    def tamper(texts, results):  # breaks on the window holding the end of the response
        return [] if any("secret is" in t for t in texts) else results

    for on_block in ("raise", "refuse"):
        guarded = guard_client(sdk_client(llm), Guard(Tampered(tamper), _policy()),
                               on_block=on_block, window_chars=80, overlap_chars=10)
        got = []
        stream = guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "tell me the secret"}], stream=True)
        if on_block == "raise":
            with pytest.raises(ResponseBlockedError) as err:
                for chunk in stream:
                    got.append(chunk)
            assert err.value.verdict.findings[0].kind == "error"
        else:
            got = list(stream)
            assert got[-1].choices[0].finish_reason == "content_filter"
        shown = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
        assert shown.startswith("Sure. word")  # windows checked before the failure went out
        assert "secret" not in shown and "xyzzy" not in shown  # held text never leaks


def test_nan_scores_from_a_bundle_with_nan_weights_are_a_failure(trigger_bundle, tokenizer):
    model = BundleClassifier.from_pretrained(trigger_bundle).model
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    from guardmerge import inspect_bundle

    clf = BundleClassifier(model, tokenizer, inspect_bundle(trigger_bundle).heads)
    assert torch.isnan(torch.tensor(clf.classify(["hello"])[0].score("jailbreak", "jailbreak")))
    v = Guard(clf, Policy.from_yaml(
        "input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}")).check_text("hi")
    assert v.blocked and v.findings[0].kind == "error"


def test_a_bundle_with_non_finite_weights_is_refused_at_load(trigger_bundle, tmp_path):
    for value, tensor in ((float("nan"), "classifier.bias"),
                          (float("inf"), "bert.encoder.layer.0.attention.self.value.weight")):
        bundle = tmp_path / f"bad-{tensor}"
        shutil.copytree(trigger_bundle, bundle)
        weights = load_file(str(bundle / "model.safetensors"))
        weights[tensor].view(-1)[0] = value
        save_file(weights, str(bundle / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=rf"tensor '{tensor}' holds NaN or infinite"):
            BundleClassifier.from_pretrained(bundle)


@pytest.mark.parametrize("key,value", [("block", ".nan"), ("flag", ".inf"), ("block", "-.inf")])
def test_policies_reject_non_finite_thresholds_with_file_and_key_path(tmp_path, key, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"input: {{rules: [{{head: jailbreak, labels: [jailbreak], {key}: {value}}}]}}\n")
    with pytest.raises(PolicyError, match=rf"p\.yaml: input\.rules\[0\]\.{key}: expected a "
                                          r"finite number"):
        Policy.load(path)
    with pytest.raises(PolicyError, match=r"timeout: expected a finite number"):
        Policy.from_yaml(JB_POLICY + "timeout: .inf\n")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("sources")
    base, state = build_base_folder(d / "base", tokenizer=tokenizer, seed=0)
    jb = build_classifier_folder(d / "jb", ["benign", "jailbreak"], tokenizer=tokenizer, seed=1,
                                 base_state=state)
    return {"base": base, "jb": jb, "dir": d}


@pytest.mark.parametrize("extra,model_extra,key", [
    ("parameters: {lambda: .nan}", "", "parameters.lambda"),
    ("parameters: {weight: .inf}", "", "parameters.weight"),
    ("parameters: {density: -.inf}", "", "parameters.density"),
    ("", ", weight: .nan", "models[0].weight"),
])
def test_recipes_reject_non_finite_numbers_with_file_and_key_path(sources, tmp_path, extra,
                                                                  model_extra, key):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {sources['base']}\nmethod: ties\n{extra}\nmodels:\n"
                    f"  - {{model: {sources['jb']}, head: jb{model_extra}}}\n")
    with pytest.raises(RecipeError, match=re.escape(f"recipe.yaml: {key}: expected a finite")):
        MergeRecipe.load(path)
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_merge_never_writes_a_non_finite_tensor(sources, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(sources["jb"], poisoned)
    weights = load_file(str(poisoned / "model.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    recipe = {"base": str(sources["base"]), "method": "task_arithmetic",
              "models": [{"model": str(poisoned), "head": "jb"}]}
    with pytest.raises(MergeError, match=rf"tensor '{name}': the merge produced NaN"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written either
    # finite sources and a finite lambda can still overflow: caught the same way
    huge = {"base": str(sources["base"]), "method": "task_arithmetic", "dtype": "float16",
            "parameters": {"lambda": 1e7}, "models": [{"model": str(sources["jb"]), "head": "jb"}]}
    with pytest.raises(MergeError, match="NaN or infinite"):
        merge(huge, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(RecipeError, match=r"parameters\.lambda: 1e\+300 does not fit a float32"):
        merge({**huge, "parameters": {"lambda": 1e300}}, tmp_path / "out3")


# -- 9: timeouts ------------------------------------------------------------------------------


class Hanging(Classifier):
    """Blocks until ``release`` is set (set at the end of each test)."""

    def __init__(self):
        self.inner = FunctionClassifier(JB_HEADS, jb_score)
        self.heads = self.inner.heads
        self.name = "hanging"
        self.release = threading.Event()
        self.entered = threading.Event()

    def classify(self, texts, *, max_tokens=None):
        self.entered.set()
        self.release.wait()
        return self.inner.classify(texts, max_tokens=max_tokens)


@pytest.fixture()
def hanging():
    clf = Hanging()
    yield clf
    clf.release.set()


def test_a_check_past_the_guard_timeout_follows_on_error(hanging):
    v = Guard(hanging, _policy(), timeout=0.05).check_text("hello")
    assert v.blocked and "longer than its timeout of 0.05 s" in v.findings[0].detail
    v = Guard(hanging, _policy("timeout: 0.05\non_error: flag\n")).check_text("hello")
    assert v.flagged
    with pytest.raises(ValueError, match="timeout"):
        Guard(hanging, _policy(), timeout=0)
    with pytest.raises(PolicyError, match=r"timeout: expected a number > 0, got 0"):
        _policy("timeout: 0\n")


def test_the_async_check_waits_without_blocking_the_event_loop(hanging):
    guard = Guard(hanging, _policy(), timeout=0.2)

    async def run():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        verdict = await guard.acheck([{"role": "user", "content": "hello"}])
        done = True
        await task
        return verdict, ticks

    verdict, ticks = asyncio.run(run())
    assert verdict.blocked and hanging.entered.is_set()
    assert ticks >= 1  # the loop ran other work while the check waited


def test_a_timed_out_prompt_check_never_calls_the_upstream(llm, hanging):
    guarded = guard_client(sdk_client(llm), Guard(hanging, _policy(), timeout=0.05))
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.verdict.findings[0].kind == "error"
    assert llm.requests == []


def test_classifier_errors_name_the_problem():
    from guardmerge.classifier import validate_scores

    clf = FunctionClassifier(JB_HEADS, jb_score)
    with pytest.raises(ClassifierError, match="returned 1 results for 2 texts"):
        validate_scores(clf.classify(["a"]), 2, clf.heads, "x")
