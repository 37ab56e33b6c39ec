"""Guard integrity, 2 and 5: no evasion by encoding; messages read once, every part accounted.

The evasions are driven through the real trigger bundle (its jailbreak head fires iff the word
"xyzzy" is in the window) and the real ``openai`` client: each one blocks, the finding says the
normalised form fired and points at the original characters. Ordinary Russian, Greek and
Japanese text is left as it is and scored once.
"""

from __future__ import annotations


import pytest
from conftest import JB_HEADS, JB_POLICY, jb_score, sdk_client

from guardmerge import (BundleClassifier, FunctionClassifier, Guard, Policy, PromptBlockedError,
                        guard_client, normalize_text, normalized_forms)

TAGS = "".join(chr(0xE0000 + ord(c)) for c in "xyzzy")
EVASIONS = {
    "hangul filler": "xy\u3164zzy",
    "halfwidth hangul filler": "xy\uffa0zzy",
    "zero-width space": "xy\u200bzzy",
    "zero-width joiner": "x\u200dyzzy",
    "soft hyphen": "xyz\u00adzy",
    "word joiner": "xyzz\u2060y",
    "combining grapheme joiner": "xy\u034fzzy",
    "variation selector": "xyz\ufe0fzy",
    "variation selector supplement": "xyz\U000e0101zy",
    "bidi override": "\u202exyzzy\u202c",
    "fullwidth": "ｘｙｚｚｙ",
    "math bold": "𝐱𝐲𝐳𝐳𝐲",
    "math script": "𝓍𝓎𝓏𝓏𝓎",
    "cyrillic confusables": "хуzzу",
    "cyrillic and fullwidth": "хｙｚｚу",
    "tag characters": TAGS,
    "reserved default-ignorable U+2065": "xy\u2065zzy",
    # lookalike letters inside a Latin-only word (no mixed script to trigger the TR39 fold)
    "latin small capitals": "xʏᴢᴢʏ",
    "modifier and small capitals": "ˣʏᴢᴢʏ",
    "y with hook": "xƴzzƴ",
    "z with retroflex hook": "xyʐʐy",
    "z with swash tail (no TR39 entry)": "xyɀɀy",
    # combining marks as decoration: enclosing (Me) and overlay / zalgo (Mn)
    "enclosing marks": "x\u20dey\u20dez\u20dez\u20dey\u20de",
    "overlay marks": "x\u0338y\u0338z\u0338z\u0338y\u0338",
    "zalgo": "x\u0301\u0302y\u0303z\u0304z\u0305y\u0306",
}
# invisibles and tag runs used as word separators: removing them glues the words (and BERT's
# own normaliser glues the original the same way), while an LLM reads two words
SEPARATED = {
    "zero-width space": "hello\u200bxyzzy",
    "zero-width spaces on both sides": "hello\u200bxyzzy\u200bworld",
    "word joiner": "hello\u2060xyzzy",
    "soft hyphen": "hello\u00adxyzzy",
    "bidi embedding": "hello\u202axyzzy\u202c",
    "hangul filler": "hello\u3164xyzzy",
    "tag characters after a word": "hello" + TAGS,
    "tag sentence after a word": "Hi" + "".join(chr(0xE0000 + ord(c)) for c in "xyzzy now"),
}
ORDINARY = {
    "russian": "Привет! Как дела? Я читаю книгу о Москве и пью чай.",
    "greek": "Καλημέρα, τι κάνεις; Διαβάζω ένα βιβλίο για την Αθήνα.",
    "japanese": "こんにちは。東京タワーへ行きたいです。今日はいい天気ですね。",
    "latin with accents": "Le café de la gare est fermé; naïve façade, Straße über München.",
}


@pytest.fixture(scope="module")
def trigger_guard(trigger_bundle):
    policy = Policy.from_yaml("""
input: {rules: [{id: jb, head: jailbreak, labels: [jailbreak], block: 0.9}]}
output: {rules: [{id: jb-out, head: jailbreak, labels: [jailbreak], block: 0.9}]}
""")
    return Guard(BundleClassifier.from_pretrained(trigger_bundle), policy)


def test_the_plain_trigger_blocks_on_the_original_form(trigger_guard):
    v = trigger_guard.check_text("please xyzzy now")
    assert v.blocked and [f.form for f in v.findings] == ["original"]
    assert v.findings[0].span == (0, len("please xyzzy now"))


@pytest.mark.parametrize("name", list(EVASIONS))
def test_every_evasion_of_the_trigger_blocks_through_the_real_model(trigger_guard, name):
    word = EVASIONS[name]
    text = f"please {word} now"
    assert normalize_text(text).text == "please xyzzy now"
    v = trigger_guard.check_text(text)
    assert v.blocked, name
    finding = v.findings[0]
    # BERT's own normaliser already drops some invisibles; where the model misses the original
    # text, the finding says the normalised form fired
    original = trigger_guard.classifier.classify([text])[0].score("jailbreak", "jailbreak")
    assert finding.form == ("original" if original >= 0.9 else "normalized")
    assert finding.head == "jailbreak"
    assert finding.span == (0, len(text))  # the window's span, in original characters
    if finding.form == "normalized":
        assert "(normalized text)" in finding.describe()


def _missed(guard, cases):
    """The cases the model alone scores below 0.5 (one batch)."""
    scores = guard.classifier.classify([f"please {word} now" for word in cases.values()])
    return {name for name, s in zip(cases, scores) if s.score("jailbreak", "jailbreak") < 0.5}


def test_the_model_alone_misses_the_evasions_the_normalisation_catches(trigger_guard):
    # what the probes found passing: fillers, fullwidth, math letters, confusables, tags,
    # Latin lookalikes, enclosing marks
    assert {"hangul filler", "fullwidth", "math bold", "cyrillic confusables",
            "tag characters", "latin small capitals", "z with swash tail (no TR39 entry)",
            "enclosing marks"} <= _missed(trigger_guard, EVASIONS)
    assert _missed(trigger_guard, SEPARATED) == set(SEPARATED)  # BERT glues the words as well


@pytest.mark.parametrize("name", list(EVASIONS))
def test_every_evasion_is_blocked_by_a_guarded_openai_client(llm, trigger_guard, name):
    guarded = guard_client(sdk_client(llm), trigger_guard)
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"hi {EVASIONS[name]}"}])
    assert err.value.verdict.findings[0].head == "jailbreak"
    assert llm.requests == []


@pytest.mark.parametrize("name", list(SEPARATED))
def test_invisible_word_separators_block_through_the_spaced_form(trigger_guard, name):
    text = f"please {SEPARATED[name]} now"
    forms = {f.form: f for f in normalized_forms(text)}
    assert set(forms) == {"normalized", "spaced"}
    assert " xyzzy" in forms["spaced"].text and "xyzzy " in forms["spaced"].text + " "
    v = trigger_guard.check_text(text)
    assert v.blocked, name
    finding = v.findings[0]
    assert finding.head == "jailbreak" and finding.form == "spaced"
    assert finding.span == (0, len(text))  # in original characters
    assert "removed characters as spaces" in finding.describe()


def test_the_spaced_form_maps_each_inserted_space_to_the_removed_run():
    text = "hello\u200b\u200bxyzzy"
    spaced = normalized_forms(text)[-1]
    assert spaced.form == "spaced" and spaced.text == "hello xyzzy"
    assert spaced.original_span(5, 6) == (5, 7)      # the space stands for both invisibles
    assert spaced.original_span(6, 11) == (7, 12)
    tagged = normalized_forms("hi" + TAGS)[-1]
    assert tagged.text == "hi xyzzy" and tagged.original_span(3, 8) == (2, 7)
    # at a word's edge nothing is glued, so no spaced form: one extra form only
    assert [f.form for f in normalized_forms("\u202exyzzy\u202c")] == ["normalized"]
    assert [f.form for f in normalized_forms("a \u200b b")] == ["normalized"]


def test_every_default_ignorable_code_point_is_removed():
    # DerivedCoreProperties.txt, Default_Ignorable_Code_Point (Unicode 15.1 / 16.0); the tag
    # characters U+E0020..U+E007E are decoded instead (tested above)
    ranges = [(0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
              (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
              (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
              (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
              (0xE0000, 0xE001F), (0xE007F, 0xE0FFF)]
    kept = [hex(cp) for lo, hi in ranges for cp in range(lo, hi + 1)
            if normalize_text(f"a{chr(cp)}b").text != "ab"]
    assert kept == []


def test_ordinary_accented_letters_are_never_folded():
    for word in ("café", "naïve", "façade", "über", "Straße", "señor", "Æble"):
        assert normalized_forms(word) == (), word  # precomposed accents: nothing to score twice
    decomposed = "cafe\u0301"  # e + combining acute: NFKC composes it, the accent stays
    assert [f.text for f in normalized_forms(decomposed)] == ["café"]
    assert not normalize_text("Le café est fermé, naïve façade über alles").changed
    # letters without a canonical decomposition that TR39 maps to ASCII are folded, in the
    # extra form only (the original is scored as well)
    assert normalize_text("København Łódź").text == "Kobenhavn Lódź"


def test_the_disarm_functions_we_use_keep_their_behaviour():
    # disarm is pre-1.0 and bounded below only: these pin what the normalisation relies on
    import disarm

    assert disarm.normalize_confusables("х") == "x" and disarm.normalize_confusables("у") == "y"
    assert disarm.normalize_confusables("ᴢ") == "z" and disarm.normalize_confusables("ʐ") == "z"
    assert disarm.normalize_confusables("é") == "é" and disarm.normalize_confusables("ß") == "ß"
    assert disarm.is_mixed_script("хуzzу") and not disarm.is_mixed_script("хуу")
    assert not disarm.is_mixed_script("xyzzy") and not disarm.is_mixed_script("東京タワーへ")
    assert disarm.detect_scripts("ᴢ") == [disarm.Script.LATIN]
    assert disarm.detect_scripts("х") == [disarm.Script.CYRILLIC]


def test_spans_map_back_to_the_original_characters():
    text = "a хуzzу and ｘｙｚｚｙ and xy\u200bzzy"
    n = normalize_text(text)
    assert n.text == "a xyzzy and xyzzy and xyzzy"
    spans = []
    start = 0
    for _ in range(3):
        i = n.text.index("xyzzy", start)
        spans.append(text[slice(*n.original_span(i, i + 5))])
        start = i + 5
    assert spans == ["хуzzу", "ｘｙｚｚｙ", "xy\u200bzzy"]
    tags = normalize_text("see" + TAGS + "!")
    assert tags.text == "seexyzzy!" and tags.original_span(3, 8) == (3, 8)


@pytest.mark.parametrize("name", list(ORDINARY))
def test_ordinary_non_latin_text_is_not_mangled_and_scored_once(name):
    text = ORDINARY[name]
    assert not normalize_text(text).changed
    seen = []
    guard = Guard(FunctionClassifier(JB_HEADS, lambda t: seen.append(t) or jb_score(t)),
                  Policy.from_yaml(JB_POLICY), cache_size=0)
    assert guard.check_text(text).passed
    assert seen == [text]


def test_single_script_lookalike_words_are_left_alone():
    # a whole word of Cyrillic letters is Russian text, not a mixed-script spoof (the README
    # names this limit): only mixed-script words are folded
    assert normalize_text("хуу").text == "хуу"
    assert normalize_text("x хуу").text == "x хуу"


# -- 5: messages -------------------------------------------------------------------------------


def _recording_client(llm, guard):
    return guard_client(sdk_client(llm), guard)


def test_a_generator_of_messages_is_checked_and_sent_as_one_list(llm, jb_guard):
    guarded = _recording_client(llm, jb_guard)
    msgs = ({"role": "user", "content": f"part {i}"} for i in range(3))
    r = guarded.chat.completions.create(model="m", messages=msgs)
    assert r.choices[0].message.content == "You said: part 2"
    assert llm.requests[0]["messages"] == [{"role": "user", "content": f"part {i}"}
                                           for i in range(3)]
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(
            model="m", messages=({"role": "user", "content": t} for t in ("hi", "xyzzy")))
    assert len(llm.requests) == 1


class Flip:
    """An iterable that yields different messages on each pass."""

    def __init__(self, *passes):
        self.passes = list(passes)

    def __iter__(self):
        return iter([{"role": "user", "content": self.passes.pop(0)}])


def test_an_iterable_that_changes_between_passes_is_sent_as_it_was_checked(llm, jb_guard):
    guarded = _recording_client(llm, jb_guard)
    guarded.chat.completions.create(model="m", messages=Flip("hello", "xyzzy"))
    assert llm.requests[0]["messages"] == [{"role": "user", "content": "hello"}]
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(model="m", messages=Flip("xyzzy", "hello"))
    assert len(llm.requests) == 1


def test_responses_input_iterables_are_materialised_once(llm, jb_guard):
    guarded = _recording_client(llm, jb_guard)
    items = ({"role": "user", "content": t} for t in ("one", "two"))
    assert guarded.responses.create(model="m", input=items).output_text == "You said: two"
    assert llm.requests[0]["input"] == [{"role": "user", "content": "one"},
                                        {"role": "user", "content": "two"}]


@pytest.mark.parametrize("role", ["USER", " user", "User\t", "TOOL"])
def test_roles_match_case_insensitively_after_stripping(jb_guard, role):
    assert jb_guard.check([{"role": role, "content": "xyzzy"}]).blocked


def _guard(extra_input: str = "", on_error: str | None = None) -> Guard:
    text = JB_POLICY.replace("  roles: [user, tool]\n", f"  roles: [user, tool]\n{extra_input}")
    if on_error:
        text = f"on_error: {on_error}\n" + text
    return Guard(FunctionClassifier(JB_HEADS, jb_score), Policy.from_yaml(text))


def test_the_legacy_function_role_is_a_tool_message(llm, jb_guard):
    v = jb_guard.check([{"role": "function", "name": "f", "content": "xyzzy"}])
    assert v.blocked and v.findings[0].role == "tool"  # default policy: roles [user, tool]
    assert jb_guard.check([{"role": " Function ", "content": "fine"}]).passed
    only_function = Policy.from_yaml(JB_POLICY.replace("roles: [user, tool]",
                                                       "roles: [user, function]"))
    assert only_function.input.roles == ("user", "tool")
    guarded = guard_client(sdk_client(llm), jb_guard)
    with pytest.raises(PromptBlockedError):
        guarded.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "hi"}, {"role": "function", "name": "f",
                                                "content": "xyzzy"}])
    assert llm.requests == []


def test_unknown_roles_are_checked_with_the_user_rules_by_default(jb_guard):
    v = jb_guard.check([{"role": "hacker", "content": "xyzzy"}])
    assert v.blocked and v.findings[0].role == "unknown"  # the caller's role name never echoed
    assert jb_guard.check([{"role": "hacker", "content": "hello"}]).passed
    assert jb_guard.check([{"role": "system", "content": "xyzzy"}]).passed  # known, not listed
    blocking = _guard("  unknown_roles: block\n")
    v = blocking.check([{"role": "hacker", "content": "hello"}])
    assert v.blocked and v.findings[0].kind == "unknown_role"
    assert _guard("  unknown_roles: pass\n").check([{"role": "hacker", "content": "xyzzy"}]).passed
    with pytest.raises(ValueError, match=r"input\.unknown_roles: expected one of check, block, pass"):
        Policy.from_yaml(JB_POLICY.replace("  roles: [user, tool]\n",
                                           "  roles: [user, tool]\n  unknown_roles: maybe\n"))


UNREADABLE = {
    "part without type": [{"text": "hello"}],
    "unknown part type": [{"type": "mystery", "text": "hello"}],
    "bytes content": b"hello",
    "nested list": [["hello"]],
    "unknown object": object(),
    "bytes text field": [{"type": "text", "text": b"hello"}],
    "a number": 42,
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_content_the_guard_cannot_read_is_never_a_pass(jb_guard, name):
    v = jb_guard.check([{"role": "user", "content": UNREADABLE[name]}])
    assert v.blocked, name  # on_error defaults to block
    assert [f.kind for f in v.findings] == ["unreadable"]
    monitor = _guard(on_error="flag").check([{"role": "user", "content": UNREADABLE[name]}])
    assert monitor.flagged  # a policy that says flag gets a flag, still not a pass


def test_untyped_parts_are_scored_as_well(jb_guard):
    v = _guard(on_error="pass").check([{"role": "user", "content": [{"text": "xyzzy"}]}])
    assert v.blocked and {f.kind for f in v.findings} == {"rule", "unreadable"}


def test_unreadable_content_through_the_client_never_reaches_the_upstream(llm, jb_guard):
    guarded = _recording_client(llm, jb_guard)
    with pytest.raises(PromptBlockedError) as err:
        guarded.chat.completions.create(model="m", messages=[
            {"role": "user", "content": [{"text": "xyzzy"}]}])
    assert any("has no 'type'" in (f.detail or "") for f in err.value.verdict.findings)
    with pytest.raises(PromptBlockedError):
        guarded.completions.create(model="m", prompt=[1, 2, 3])  # token ids: unreadable
    with pytest.raises(PromptBlockedError):
        guarded.responses.create(model="m", input=[{"type": "item_reference", "id": "x"}])
    assert llm.requests == []


def test_log_records_never_carry_the_text(jb_guard, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="guardmerge")
    secret = "the-password-is-hunter2 xyzzy"
    jb_guard.check([{"role": "user", "content": secret}])
    jb_guard.check([{"role": "user", "content": [{"text": secret}]}])
    _guard(on_error="flag").check([{"role": "user", "content": [{"mystery": secret}]}])
    assert caplog.records and "hunter2" not in caplog.text


def test_prompt_text_never_reaches_logs_verdicts_or_exception_messages(llm, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="guardmerge")

    def leaky(text):  # a third-party classifier whose exception message holds the text
        if "SECRET" in text:
            raise KeyError("SECRET-hunter2 " + text)
        return jb_score(text)

    guard = Guard(FunctionClassifier(JB_HEADS, leaky), Policy.from_yaml(JB_POLICY))
    verdicts = []
    guarded = guard_client(sdk_client(llm), guard, on_verdict=verdicts.append)
    errors = []
    for messages in (
            [{"role": "user", "content": "SECRET-hunter2 my password"}],
            [{"role": "user", "content": [{"type": "SECRET-hunter2", "text": "hi"}]}],
            [{"role": "SECRET-hunter2 is my role", "content": "xyzzy"}],
            [{"role": "user", "content": [{"type": "SECRET-hunter2x" * 10}]}]):
        with pytest.raises(PromptBlockedError) as err:
            guarded.chat.completions.create(model="m", messages=messages)
        errors.append(str(err.value))
    with pytest.raises(PromptBlockedError) as err:
        guarded.responses.create(model="m", input=[{"type": "SECRET-hunter2", "id": "x"}])
    errors.append(str(err.value))
    strict = Guard(FunctionClassifier(JB_HEADS, jb_score), Policy.from_yaml(
        JB_POLICY.replace("  roles: [user, tool]\n", "  roles: [user, tool]\n"
                                                     "  unknown_roles: block\n")))
    v = strict.check([{"role": "SECRET-hunter2", "content": "hi"}])
    assert v.blocked and v.findings[0].kind == "unknown_role"
    verdicts.append(v)
    assert len(verdicts) == 6 and all(v.blocked for v in verdicts)
    assert verdicts[0].findings[0].detail == "KeyError"  # the type only, never the message
    seen = caplog.text + "".join(errors) + "".join(v.to_json() for v in verdicts)
    assert "guard check failed (KeyError)" in caplog.text
    assert "hunter2" not in seen and "SECRET" not in seen
    assert llm.requests == []
