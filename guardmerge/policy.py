"""YAML policies: rules that turn head probabilities into pass / flag / block.

A policy (see ``policies/*.yaml``)::

    version: 1
    name: default
    default_action: pass        # verdict when no rule fires
    on_error: block             # the guard failed: fail closed unless told otherwise
    max_tokens: 8192            # token budget per message (null: unlimited)
    on_too_long: flag           # action for a message over the budget (only its start is scored)
    refusal_message: "..."      # text a refusing client wrapper returns
    timeout: 5                  # seconds a check may take; longer is a guard failure (null: none)
    input:                      # prompts
      roles: [user, tool]       # which message roles are checked (case-insensitive; the
                                # legacy ``function`` role is ``tool``)
      unknown_roles: check      # a role outside system/developer/user/assistant/tool/function:
                                # check (with the user rules) | block | pass
      rules:
        - id: jailbreak
          head: jailbreak
          labels: [jailbreak]
          flag: 0.5             # score >= flag  -> flag
          block: 0.85           # score >= block -> block
          roles: [user]         # optional: narrow this rule to some roles
      non_text_parts: ignore    # image / audio parts of a message: ignore | flag | block
    output:                     # responses
      check_tool_calls: false   # also score tool-call arguments in responses
      rules: [...]

A rule fires for a message when a listed label's score (its maximum over the message's windows)
reaches a threshold. The verdict is the most severe action of any finding. When a text's
normalised forms (``guardmerge.normalized_forms``) differ from it, every form is scored and
each rule keeps its worse finding; ``Finding.form`` says which form fired. Content the guard cannot read
gets ``on_error``: never a silent pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

from ._validate import Checker, load_yaml, parse_yaml
from ._messages import normalize_role
from .exceptions import ConfigError, PolicyError, error_detail
from .labels import Head
from .verdict import Action, Finding, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from .classifier import TextScores
    from .normalize import NormalizedText

__all__ = ["Policy", "Rule", "DirectionRules", "Target", "ROLES", "UNKNOWN_ROLES"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DIRECTIONS = ("input", "output")
_ACTIONS = tuple(a.value for a in Action)
_TOP_KEYS = {"version", "name", "description", "default_action", "on_error", "on_too_long",
             "max_tokens", "refusal_message", "timeout", "input", "output"}
UNKNOWN_ROLES = ("check", "block", "pass")
_RULE_KEYS = {"id", "head", "labels", "flag", "block", "roles", "description"}
DEFAULT_REFUSAL = "I can't help with that request."


@dataclass(frozen=True)
class Rule:
    id: str
    head: str
    labels: tuple[str, ...]
    flag: float | None
    block: float | None
    roles: tuple[str, ...] | None = None
    description: str | None = None

    def action_for(self, score: float) -> tuple[Action, float | None]:
        if self.block is not None and score >= self.block:
            return Action.BLOCK, self.block
        if self.flag is not None and score >= self.flag:
            return Action.FLAG, self.flag
        return Action.PASS, None


@dataclass(frozen=True)
class DirectionRules:
    roles: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    non_text_parts: Action = Action.PASS      # input: what a non-text content part earns
    check_tool_calls: bool = False            # output: score tool-call arguments too
    unknown_roles: str = "check"              # input: a role outside ROLES (check | block | pass)

    def rules_for(self, role: str) -> list[Rule]:
        if role not in self.roles:
            return []
        return [r for r in self.rules if r.roles is None or role in r.roles]


@dataclass(frozen=True)
class Policy:
    name: str
    input: DirectionRules
    output: DirectionRules
    default_action: Action = Action.PASS
    on_error: Action = Action.BLOCK
    on_too_long: Action = Action.FLAG
    max_tokens: int | None = None
    refusal_message: str = DEFAULT_REFUSAL
    description: str | None = None
    source: str = "<policy>"
    version: int = 1
    timeout: float | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], heads: Sequence[Head] | None = None) -> "Policy":
        """Load and validate a YAML policy; with ``heads``, also check every head and label."""
        data = load_yaml(path, PolicyError)
        return cls.from_dict(data, source=str(path), heads=heads)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>",
                  heads: Sequence[Head] | None = None) -> "Policy":
        return cls.from_dict(parse_yaml(text, source, PolicyError), source=source, heads=heads)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>",
                  heads: Sequence[Head] | None = None) -> "Policy":
        """Validate strictly; raise one PolicyError listing every problem (file + key path)."""
        c = Checker(source)
        top = c.mapping(data, "", allowed=_TOP_KEYS)
        if top is None:
            c.raise_if_any(PolicyError)
            raise AssertionError("unreachable")
        version = top.get("version", 1)
        if version != 1:
            c.add("version", f"unsupported policy version {version!r} (this guardmerge reads 1)")
        name = c.string(top.get("name", Path(source).stem), "name") or "policy"
        desc = top.get("description")
        if desc is not None:
            c.string(desc, "description")

        def action(key: str, default: Action) -> Action:
            if key not in top:
                return default
            v = c.choice(top[key], key, _ACTIONS)
            return Action(v) if v is not None else default

        default_action = action("default_action", Action.PASS)
        on_error = action("on_error", Action.BLOCK)
        on_too_long = action("on_too_long", Action.FLAG)
        max_tokens = top.get("max_tokens")
        if max_tokens is not None:
            max_tokens = c.integer(max_tokens, "max_tokens", lo=1)
        refusal = top.get("refusal_message", DEFAULT_REFUSAL)
        refusal = c.string(refusal, "refusal_message") or DEFAULT_REFUSAL
        timeout = top.get("timeout")
        if timeout is not None:
            timeout = c.number(timeout, "timeout", lo=0.0, lo_open=True)

        sections = {}
        for direction in DIRECTIONS:
            sections[direction] = _direction(c, top.get(direction), direction)
        if not c.problems and not sections["input"].rules and not sections["output"].rules:
            c.add("", "the policy has no rules in input or output")
        if heads is not None:
            _check_heads(c, sections, heads)
        c.raise_if_any(PolicyError)
        return cls(name=name, description=desc, input=sections["input"], output=sections["output"],
                   default_action=default_action, on_error=on_error, on_too_long=on_too_long,
                   max_tokens=max_tokens, refusal_message=refusal, source=source, version=1,
                   timeout=timeout)

    def bind(self, heads: Sequence[Head]) -> "Policy":
        """Check that every rule's head and labels exist in ``heads`` (a PolicyError listing
        every problem if not) and return the policy. Works for a policy built with the
        constructor as for a loaded one."""
        c = Checker(self.source)
        _check_heads(c, {"input": self.input, "output": self.output}, heads)
        c.raise_if_any(PolicyError)
        return self

    def rules(self, direction: str) -> DirectionRules:
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be 'input' or 'output', got {direction!r}")
        return self.input if direction == "input" else self.output

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, direction: str, targets: Iterable["Target | tuple[Any, ...]"],
                 *, include_scores: bool = False, extra: Iterable[Finding] = ()) -> Verdict:
        """Turn scored messages into a verdict.

        ``targets``: a ``Target`` (or ``(message_index, role, TextScores)``) for every scored
        text; a target with ``normalized`` set holds the scores of one of that message's
        normalised forms, and its findings' spans are mapped back to the original characters.
        Each rule keeps its worse finding per message over all forms. ``extra``: findings made outside
        the model (non-text parts, unreadable content, unknown roles).
        """
        section = self.rules(direction)
        findings: list[Finding] = list(extra)
        score_dump: list[dict[str, dict[str, float]]] = []
        for target in targets:
            t = target if isinstance(target, Target) else Target(*target)
            scores, norm = t.scores, t.normalized
            form = "original" if norm is None else norm.form
            span = (lambda a, b: (a, b)) if norm is None else norm.original_span
            if include_scores and norm is None:
                score_dump.append({h: dict(hs.scores) for h, hs in scores.heads.items()})
            for rule in section.rules_for(t.rules_role or t.role):
                hs = scores.heads[rule.head]
                for label in rule.labels:
                    score = hs.scores[label]
                    act, threshold = rule.action_for(score)
                    if act is Action.PASS:
                        continue
                    window = scores.windows[hs.windows[label]]
                    findings.append(Finding(
                        kind="rule", action=act, head=rule.head, label=label, score=score,
                        threshold=threshold, rule=rule.id, message_index=t.index, role=t.role,
                        span=span(*window.span), form=form))
            if scores.truncated:
                findings.append(Finding(
                    kind="too_long", action=self.on_too_long, message_index=t.index, role=t.role,
                    span=span(scores.scanned_chars, scores.text_length), form=form,
                    detail=(f"{scores.n_tokens} tokens exceed the policy's budget of "
                            f"{self.max_tokens}; only the first {scores.scanned_tokens} were scored")))
        findings = _worst_per_rule(findings)
        findings.sort(key=lambda f: (-f.action.severity, f.message_index or 0))
        act = Action.worst((f.action for f in findings), default=Action.PASS)
        if not findings:
            act = self.default_action
        return Verdict(action=act, direction=direction, findings=findings, policy=self.name,
                       scores=score_dump if include_scores else None)

    def error_verdict(self, direction: str, error: BaseException) -> Verdict:
        """The verdict when the guard itself failed: ``on_error`` (block unless told otherwise)."""
        detail = error_detail(error)  # never the message of a third-party error: text
        return Verdict(action=self.on_error, direction=direction, policy=self.name,
                       findings=[Finding(kind="error", action=self.on_error, detail=detail)])


class Target(NamedTuple):
    """One scored text of a check (see ``Policy.evaluate``)."""

    index: int
    role: str
    scores: "TextScores"
    normalized: "NormalizedText | None" = None   # set: the scores of this normalised form
    rules_role: str | None = None                # the role whose rules apply (default: role)


_FORM_RANK = {"original": 2, "normalized": 1}   # on a tie, the plainest form is reported


def _worst_per_rule(findings: list[Finding]) -> list[Finding]:
    """Per (kind, message, rule, label): the most severe finding, then the highest score, the
    original form before the normalised ones. Other findings are kept as they are."""
    best: dict[tuple[Any, ...], Finding] = {}
    out: list[Finding] = []

    def rank(f: Finding) -> tuple[int, float, int]:
        return (f.action.severity, f.score or 0.0, _FORM_RANK.get(f.form or "", 0))

    for f in findings:
        if f.kind not in ("rule", "too_long"):
            out.append(f)
            continue
        key = (f.kind, f.message_index, f.rule, f.label)
        old = best.get(key)
        if old is None or rank(f) > rank(old):
            best[key] = f
    return out + list(best.values())


def _direction(c: Checker, value: Any, direction: str) -> DirectionRules:
    default_roles = ("user",) if direction == "input" else ("assistant",)
    if value is None:
        return DirectionRules(roles=default_roles)
    allowed = {"roles", "rules", "non_text_parts", "unknown_roles"} if direction == "input" \
        else {"rules", "check_tool_calls"}
    sec = c.mapping(value, direction, allowed=allowed)
    if sec is None:
        return DirectionRules(roles=default_roles)
    roles = default_roles
    if "roles" in sec:
        got = c.string_list(sec["roles"], f"{direction}.roles")
        if got is not None:
            got = list(dict.fromkeys(normalize_role(r) for r in got))  # function is tool
            bad = [r for r in got if r not in ROLES]
            for r in bad:
                c.add(f"{direction}.roles", f"unknown role {r!r} (known: {', '.join(ROLES)})")
            roles = tuple(got)
    non_text = Action.PASS
    if "non_text_parts" in sec:
        v = c.choice(sec["non_text_parts"], f"{direction}.non_text_parts", ("ignore", "flag", "block"))
        non_text = {"ignore": Action.PASS, "flag": Action.FLAG, "block": Action.BLOCK}.get(v or "ignore",
                                                                                        Action.PASS)
    unknown_roles = "check"
    if "unknown_roles" in sec:
        unknown_roles = c.choice(sec["unknown_roles"], f"{direction}.unknown_roles",
                                 UNKNOWN_ROLES) or "check"
    tool_calls = False
    if "check_tool_calls" in sec:
        tool_calls = bool(c.boolean(sec["check_tool_calls"], f"{direction}.check_tool_calls"))
    rules: list[Rule] = []
    raw_rules = sec.get("rules", [])
    if not isinstance(raw_rules, list):
        c.add(f"{direction}.rules", "expected a list of rules")
        raw_rules = []
    ids: set[str] = set()
    for i, raw in enumerate(raw_rules):
        path = f"{direction}.rules[{i}]"
        rule = _rule(c, raw, path, direction, roles)
        if rule is None:
            continue
        if rule.id in ids:
            c.add(f"{path}.id", f"duplicate rule id {rule.id!r}")
        ids.add(rule.id)
        rules.append(rule)
    return DirectionRules(roles=roles, rules=tuple(rules), non_text_parts=non_text,
                          check_tool_calls=tool_calls, unknown_roles=unknown_roles)


def _rule(c: Checker, raw: Any, path: str, direction: str, roles: tuple[str, ...]) -> Rule | None:
    allowed = _RULE_KEYS if direction == "input" else _RULE_KEYS - {"roles"}
    r = c.mapping(raw, path, required=("head", "labels"), allowed=allowed)
    if r is None:
        return None
    before = len(c.problems)
    head = c.string(r.get("head"), f"{path}.head") if "head" in r else None
    labels = c.string_list(r.get("labels"), f"{path}.labels") if "labels" in r else None
    thresholds = {}
    for key in ("flag", "block"):
        v = r.get(key)
        thresholds[key] = None if v is None else c.number(v, f"{path}.{key}", lo=0.0, hi=1.0)
    if r.get("flag") is None and r.get("block") is None:
        c.add(path, "a rule needs a 'flag' or a 'block' threshold (or both)")
    f, b = thresholds["flag"], thresholds["block"]
    if f is not None and b is not None and f > b:
        c.add(f"{path}.flag", f"flag threshold {f:g} is above the block threshold {b:g}")
    rule_roles = None
    if "roles" in r:
        got = c.string_list(r["roles"], f"{path}.roles")
        if got is not None:
            got = list(dict.fromkeys(normalize_role(role) for role in got))
            for role in got:
                if role not in ROLES:
                    c.add(f"{path}.roles", f"unknown role {role!r} (known: {', '.join(ROLES)})")
                elif role not in roles:
                    c.add(f"{path}.roles", f"role {role!r} is not in {direction}.roles "
                          f"({', '.join(roles)}), so this rule would never see it")
            rule_roles = tuple(got)
    rid = r.get("id")
    if rid is not None:
        rid = c.string(rid, f"{path}.id")
    if len(c.problems) > before or head is None or labels is None:
        return None
    return Rule(id=rid or f"{direction}[{path.rsplit('[', 1)[1][:-1]}]:{head}", head=head,
                labels=tuple(labels), flag=f, block=b, roles=rule_roles,
                description=r.get("description"))


def _check_heads(c: Checker, sections: Mapping[str, DirectionRules], heads: Sequence[Head]) -> None:
    by_name = {h.name: h for h in heads}
    for direction, sec in sections.items():
        for i, rule in enumerate(sec.rules):
            path = f"{direction}.rules[{i}]"
            head = by_name.get(rule.head)
            if head is None:
                c.add(f"{path}.head", f"unknown head {rule.head!r} (the bundle has: "
                      f"{', '.join(by_name) or 'none'})")
                continue
            for label in rule.labels:
                if label not in head.labels:
                    c.add(f"{path}.labels", f"head {rule.head!r} has no label {label!r} "
                          f"(its labels: {', '.join(head.labels)})")

