"""YAML policies: strict validation with file + key path, and evaluation into verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardmerge import (Action, FunctionClassifier, Guard, Policy, PolicyError, Rule,
                        inspect_bundle)
from guardmerge.testing import TRIGGER, random_text

POLICIES = Path(__file__).resolve().parent.parent / "policies"
HEADS = {"jailbreak": ["benign", "jailbreak"], "toxicity": ["normal", "offensive", "hateful"]}


@pytest.mark.parametrize("name", ["default.yaml", "strict.yaml", "monitor.yaml"])
def test_shipped_policies_validate_and_bind(name, random_bundle):
    policy = Policy.load(POLICIES / name, heads=inspect_bundle(random_bundle).heads)
    assert policy.input.rules
    assert policy.on_error in (Action.BLOCK, Action.FLAG)


def test_monitor_policy_never_blocks():
    policy = Policy.load(POLICIES / "monitor.yaml")
    rules = policy.input.rules + policy.output.rules
    assert all(r.block is None for r in rules)
    assert policy.on_error is Action.FLAG and policy.on_too_long is Action.FLAG


def test_all_problems_reported_at_once_with_file_and_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("""
version: 1
name: bad
colour: red
on_error: explode
max_tokens: -5
input:
  roles: [user, robot]
  rules:
    - head: jailbreak
      labels: [jailbreak]
      block: 1.5
    - head: jailbreak
      labels: jailbreak
      flag: 0.9
      block: 0.5
    - head: toxicity
      labels: [hateful]
      flag: "high"
    - head: toxicity
      labels: []
      block: 0.5
      mood: angry
output:
  rules:
    - head: toxicity
      labels: [offensive]
""")
    with pytest.raises(PolicyError) as err:
        Policy.load(path)
    problems = err.value.problems
    expected = [
        "colour: unknown key",
        "on_error: expected one of pass, flag, block, got 'explode'",
        "max_tokens: expected an integer >= 1, got -5",
        "input.roles: unknown role 'robot'",
        "input.rules[0].block: expected a number in [0, 1], got 1.5",
        "input.rules[1].flag: flag threshold 0.9 is above the block threshold 0.5",
        "input.rules[2].flag: expected a number in [0, 1], got a string ('high')",
        "input.rules[3].labels: expected a non-empty list of strings",
        "input.rules[3].mood: unknown key",
        "output.rules[0]: a rule needs a 'flag' or a 'block' threshold",
    ]
    for fragment in expected:
        assert any(p.startswith(f"{path}: ") and fragment in p for p in problems), fragment
    assert len(problems) == len(expected)


def test_unknown_heads_and_labels_when_bound(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("""
input:
  rules:
    - {head: jailbreak, labels: [jailbreak, evil], block: 0.9}
    - {head: spam, labels: [spam], flag: 0.5}
""")
    heads = FunctionClassifier(HEADS, lambda t: {}).heads
    with pytest.raises(PolicyError) as err:
        Policy.load(path, heads=heads)
    text = str(err.value)
    assert f"{path}: input.rules[0].labels: head 'jailbreak' has no label 'evil'" in text
    assert f"{path}: input.rules[1].head: unknown head 'spam'" in text
    assert len(err.value.problems) == 2


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("input:\n  rules: [\n    {head: a\n")
    with pytest.raises(PolicyError, match=r"broken\.yaml: invalid YAML \(line \d+"):
        Policy.load(path)


def test_missing_file():
    with pytest.raises(PolicyError, match="no such file"):
        Policy.load("nope/never.yaml")


def test_rule_role_outside_section_roles():
    with pytest.raises(PolicyError, match=r"input\.rules\[0\]\.roles: role 'system' is not in "
                                          r"input\.roles"):
        Policy.from_dict({"input": {"roles": ["user"], "rules": [
            {"head": "jailbreak", "labels": ["jailbreak"], "block": 0.5, "roles": ["system"]}]}})


def _scores(jb: float = 0.0, hateful: float = 0.0):
    def fn(text: str):
        s = {"jailbreak": {"jailbreak": jb},
             "toxicity": {"normal": 1.0 - hateful, "offensive": 0.0, "hateful": hateful}}
        if "JB" in text:
            s["jailbreak"]["jailbreak"] = 0.95
        if "MID" in text:
            s["jailbreak"]["jailbreak"] = 0.6
        if "HATE" in text:
            s["toxicity"] = {"hateful": 0.97, "offensive": 0.01}
        return s
    return FunctionClassifier(HEADS, fn)


def test_thresholds_give_pass_flag_block():
    guard = Guard(_scores(), Policy.load(POLICIES / "default.yaml"))
    assert guard.check_text("hello").action is Action.PASS
    v = guard.check_text("MID please")
    assert v.action is Action.FLAG
    assert [(f.head, f.label, f.threshold) for f in v.findings] == [("jailbreak", "jailbreak", 0.5)]
    v = guard.check_text("JB now")
    assert v.blocked and v.findings[0].threshold == 0.9 and v.findings[0].score == pytest.approx(0.95)


def test_boundary_score_equal_to_threshold_fires():
    clf = FunctionClassifier(HEADS, lambda t: {"jailbreak": {"jailbreak": 0.9},
                                               "toxicity": {"normal": 1.0}})
    guard = Guard(clf, Policy.load(POLICIES / "default.yaml"))
    assert guard.check_text("x").blocked


def test_roles_decide_which_messages_are_checked():
    guard = Guard(_scores(), Policy.load(POLICIES / "default.yaml"))
    messages = [
        {"role": "system", "content": "JB system prompt text"},     # not in input.roles
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "JB earlier answer"},      # not in input.roles
        {"role": "tool", "content": [{"type": "text", "text": "MID tool output"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    v = guard.check(messages)
    assert v.action is Action.FLAG
    assert [(f.message_index, f.role) for f in v.findings] == [(3, "tool")]
    strict = Guard(_scores(), Policy.load(POLICIES / "strict.yaml"))
    v = strict.check(messages)
    assert v.blocked
    assert {f.message_index for f in v.findings if f.action is Action.BLOCK} == {0, 2, 3}


def test_output_direction_uses_output_rules():
    guard = Guard(_scores(), Policy.load(POLICIES / "default.yaml"))
    assert guard.check_text("MID", direction="output").passed   # no jailbreak rule on output
    v = guard.check(["fine", "HATE"], direction="output")
    assert v.blocked and v.findings[0].message_index == 1 and v.findings[0].role == "assistant"


def test_default_action_applies_when_nothing_fires():
    policy = Policy.from_dict({"default_action": "flag", "input": {"rules": [
        {"head": "jailbreak", "labels": ["jailbreak"], "block": 0.9}]}})
    assert Guard(_scores(), policy).check_text("hello").action is Action.FLAG


def test_guard_failure_fails_closed_unless_policy_says_otherwise():
    def boom(text):
        raise RuntimeError("model exploded")

    clf = FunctionClassifier(HEADS, boom)
    v = Guard(clf, Policy.load(POLICIES / "default.yaml")).check_text("hello")
    # a third-party error is recorded by its type: its message may carry the checked text
    assert v.blocked and v.findings[0].kind == "error" and v.findings[0].detail == "RuntimeError"
    v = Guard(clf, Policy.load(POLICIES / "monitor.yaml")).check_text("hello")
    assert v.action is Action.FLAG


def test_too_long_text_gets_on_too_long(trigger_classifier):
    policy = Policy.from_dict({"max_tokens": 1000, "on_too_long": "block", "input": {"rules": [
        {"head": "jailbreak", "labels": ["jailbreak"], "block": 0.9}]}})
    text = random_text(3000, seed=4, insert={2500: TRIGGER})
    v = Guard(trigger_classifier, policy).check_text(text)
    assert v.blocked
    (f,) = v.findings
    assert f.kind == "too_long" and f.span[1] == len(text) and f.span[0] < text.index(TRIGGER)
    assert "3001 tokens exceed the policy's budget of 1000" in f.detail


def test_guard_finds_buried_trigger_with_span(trigger_classifier):
    policy = Policy.from_dict({"input": {"rules": [
        {"head": "jailbreak", "labels": ["jailbreak"], "flag": 0.5, "block": 0.9}]}})
    text = random_text(6000, seed=11, insert={5500: TRIGGER})
    v = Guard(trigger_classifier, policy).check([{"role": "user", "content": text}])
    assert v.blocked
    start, end = v.findings[0].span
    assert start <= text.index(TRIGGER) < end


def test_verdict_is_an_object_that_serialises_to_json():
    guard = Guard(_scores(), Policy.load(POLICIES / "default.yaml"), include_scores=True)
    v = guard.check([{"role": "user", "content": "JB and HATE"}])
    data = json.loads(v.to_json())
    assert data["action"] == "block" and data["direction"] == "input" and data["policy"] == "default"
    f = data["findings"][0]
    assert set(f) == {"kind", "action", "head", "label", "score", "threshold", "rule",
                      "message_index", "role", "span", "detail", "form"}
    assert f["span"] == [0, len("JB and HATE")] and f["role"] == "user"
    assert data["scores"][0]["toxicity"]["hateful"] == pytest.approx(0.97)


def test_guard_binds_policy_to_classifier_heads():
    clf = FunctionClassifier({"spam": ["ham", "spam"]}, lambda t: {})
    with pytest.raises(PolicyError, match="unknown head 'jailbreak'"):
        Guard(clf, Policy.load(POLICIES / "default.yaml"))


def test_a_policy_built_with_its_constructor_works_in_a_guard():
    from guardmerge.policy import DirectionRules

    rule = Rule(id="jb", head="jailbreak", labels=("jailbreak",), flag=0.5, block=0.9)
    policy = Policy(name="built", input=DirectionRules(roles=("user",), rules=(rule,)),
                    output=DirectionRules(roles=("assistant",)))
    guard = Guard(_scores(), policy)
    assert guard.policy is policy
    assert guard.check_text("hello JB").blocked and guard.check_text("hello MID").flagged
    assert guard.check_text("hello").passed
    wrong = Policy(name="wrong", input=DirectionRules(roles=("user",), rules=(
        Rule(id="x", head="jailbreak", labels=("evil",), flag=0.5, block=None),)),
        output=DirectionRules(roles=("assistant",)))
    with pytest.raises(PolicyError, match="head 'jailbreak' has no label 'evil'"):
        Guard(_scores(), wrong)
