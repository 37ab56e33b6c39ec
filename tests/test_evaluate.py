"""Evaluation data, metrics against hand-computed values, eval CLI with the original column."""

from __future__ import annotations

import json

import pytest

from guardmerge import DataError, FunctionClassifier
from guardmerge.cli import main
from guardmerge.merge import Example, evaluate, load_examples, metrics
from guardmerge.labels import heads_from_layout

HEADS = heads_from_layout([("jb", ["benign", "jailbreak"]), ("tox", ["normal", "offensive", "hateful"])])


def test_metrics_against_hand_computed_values():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    m = metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 F1 0.8; b: P 1/2 R 1/2 F1 0.5; c: P 1/2 R 1/1 F1 2/3
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_label"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_label"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_label_never_predicted_or_absent_counts_zero():
    m = metrics(["a", "a"], ["a", "a"], ["a", "b"])
    assert m["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(0.5)


def test_jsonl_and_csv_several_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "hi", "head": "jb", "label": "benign"}) + "\n\n" +
        json.dumps({"text": "xyzzy", "head": "jb", "label": "jailbreak"}) + "\n")
    (tmp_path / "b.csv").write_text('text,head,label\n"you, idiot",tox,offensive\nnice,tox,normal\n')
    ex = load_examples([tmp_path / "a.jsonl", tmp_path / "b.csv"], heads=HEADS)
    assert [(e.head, e.label, e.line) for e in ex] == [("jb", "benign", 1), ("jb", "jailbreak", 3),
                                                      ("tox", "offensive", 2), ("tox", "normal", 3)]
    assert ex[2].text == "you, idiot"


def test_bad_rows_are_reported_with_file_and_line(tmp_path, caplog):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "fine", "head": "jb", "label": "benign"}),
        json.dumps({"text": "", "head": "jb", "label": "benign"}),
        json.dumps({"text": "x", "label": "benign"}),
        "{not json",
        json.dumps({"text": "x", "head": "spam", "label": "spam"}),
        json.dumps({"text": "x", "head": "jb", "label": "evil"}),
    ]) + "\n")
    with pytest.raises(DataError) as err:
        load_examples([f], heads=HEADS)
    problems = err.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{f}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "missing or empty text" in problems[0] and "missing or empty head" in problems[1]
    assert "unknown head 'spam'" in problems[3] and "has no label 'evil'" in problems[4]
    ex = load_examples([f], heads=HEADS, skip_bad=True)
    assert len(ex) == 1 and caplog.text.count("skipped bad row") == 5


def test_evaluate_uses_production_chunking_and_reports_per_head():
    clf = FunctionClassifier({"jb": ["benign", "jailbreak"]},
                             lambda t: {"jb": {"jailbreak": 0.9 if "xyzzy" in t else 0.1}})
    ex = [Example("xyzzy now", "jb", "jailbreak"), Example("hello", "jb", "benign"),
          Example("xyzzy", "jb", "benign"), Example("hi", "jb", "jailbreak")]
    rep = evaluate(clf, ex)
    h = rep.heads["jb"]
    assert h.confusion == [[1, 1], [1, 1]] and h.accuracy == 0.5 and h.macro_f1 == pytest.approx(0.5)
    assert "macro-F1=0.5000" in rep.render()


def test_eval_cli_table_with_original_column(trigger_bundle, tmp_path, capsys):
    from guardmerge.testing import TRIGGER, random_text

    rows = [{"text": random_text(30, seed=i, insert={5: TRIGGER} if i % 2 else None),
             "head": "jailbreak", "label": "jailbreak" if i % 2 else "benign"} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", str(trigger_bundle), str(data), "--source",
                 f"jailbreak={trigger_bundle}"]) == 0
    out = capsys.readouterr().out
    assert "head jailbreak: n=10 accuracy=1.0000 macro-F1=1.0000" in out
    assert "original F1" in out and "average" in out
    assert main(["eval", str(trigger_bundle), str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["heads"]["jailbreak"]["accuracy"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "head": "jailbreak", "label": "nope"}) + "\n")
    assert main(["eval", str(trigger_bundle), str(bad)]) == 2
    assert f"{bad}:1: head 'jailbreak' has no label 'nope'" in capsys.readouterr().err
