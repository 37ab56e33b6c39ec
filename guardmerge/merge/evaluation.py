"""Evaluation: labelled data -> per-head accuracy, macro-F1, per-label precision / recall,
confusion matrices; and the paper's Table-1 comparison of source models vs the merged bundle.

Data: JSONL (``{"text": ..., "head": ..., "label": ...}`` per line) or CSV with columns
``text,head,label``; several files at once. Bad rows (missing fields, empty text, unknown head
or label) are errors naming the file and line, all reported together; ``skip_bad=True`` skips
them with a warning per row instead. Texts go through the production chunking (windows, max
over windows).

Multi-label (sigmoid) heads: a text's true labels are every label its rows name for that head
(several rows, or in JSONL a list, ``"label": ["insult", "threat"]``; ``"label": []`` is a text
with none of them). A label is predicted where its score is at least 0.5. Per label:
precision, recall, F1 and a 2x2 confusion ``[[tn, fp], [fn, tp]]`` over the texts; the head's
macro-F1 is the mean of its labels' F1 (what the search maximises, as for softmax heads);
accuracy is the exact-match rate (every label right).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..exceptions import DataError
from ..labels import MULTI_LABEL, SINGLE_LABEL, Head

__all__ = ["Example", "load_examples", "check_examples", "metrics", "multilabel_metrics",
           "HeadReport", "EvalReport",
           "evaluate", "comparison_table", "render_comparison", "collapse_warnings"]

logger = logging.getLogger("guardmerge.evaluate")


@dataclass(frozen=True)
class Example:
    """One labelled text. ``label``: a label of ``head``, or for a multi-label head a tuple of
    its labels (possibly empty)."""

    text: str
    head: str
    label: str | tuple[str, ...]
    source: str = ""
    line: int = 0

    @property
    def label_set(self) -> tuple[str, ...]:
        return self.label if isinstance(self.label, tuple) else (self.label,)


def read_rows(path: Path, *, plain: bool = False) -> Iterable[tuple[int, Any]]:
    """(line number, row) of a JSONL / CSV / TSV file; a JSON error is yielded as the row.
    ``plain``: other suffixes are plain text, one ``{"text": line}`` row per non-empty line."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as fh:
        if suffix in (".jsonl", ".json", ".ndjson"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, exc
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, row
        elif plain:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    yield n, {"text": line.rstrip("\r\n")}
        else:
            raise DataError(f"{path}: unknown data format {suffix!r} (use .jsonl or .csv)")


def load_examples(paths: Sequence[str | os.PathLike[str]], *, heads: Sequence[Head] | None = None,
                  skip_bad: bool = False) -> list[Example]:
    """Read examples from JSONL / CSV files; with ``heads``, check every head and label too."""
    problems: list[str] = []
    examples: list[Example] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            problems.append(f"{path}: no such file")
            continue
        for line, row in read_rows(path):
            where = f"{path}:{line}"
            if isinstance(row, Exception):
                problems.append(f"{where}: not valid JSON ({row})")
                continue
            if not isinstance(row, Mapping):
                problems.append(f"{where}: expected an object with text, head, label")
                continue
            missing = [k for k in ("text", "head", "label") if row.get(k) in (None, "")]
            if "text" not in missing and not str(row["text"]).strip():
                missing.append("text")
            if missing:
                problems.append(f"{where}: missing or empty {', '.join(sorted(set(missing)))}")
                continue
            label = parse_label(row["label"])
            if label is None:
                problems.append(f"{where}: label: a list must hold label names")
                continue
            examples.append(Example(text=str(row["text"]), head=str(row["head"]),
                                    label=label, source=str(path), line=line))
    if heads is not None:
        bad = check_examples(examples, heads)
        problems.extend(bad)
        if skip_bad and bad:
            bad_at = {p.split(": ", 1)[0] for p in bad}
            examples = [e for e in examples if f"{e.source}:{e.line}" not in bad_at]
    if problems:
        if not skip_bad:
            raise DataError(problems)
        for prob in problems:
            logger.warning("skipped bad row: %s", prob)
    if not examples:
        raise DataError(f"no usable examples in {', '.join(str(p) for p in paths)}")
    return examples


def parse_label(value: Any) -> str | tuple[str, ...] | None:
    """A row's ``label`` field: one name, or a multi-label head's list of names (maybe none;
    sorted, once each); None for a list that holds anything but names."""
    if isinstance(value, list):
        if not all(isinstance(x, str) and x for x in value):
            return None
        return tuple(sorted(set(value)))
    return str(value)


def check_examples(examples: Sequence[Example], heads: Sequence[Head]) -> list[str]:
    by_name = {h.name: h for h in heads}
    problems = []
    for e in examples:
        head = by_name.get(e.head)
        if head is None:
            problems.append(f"{e.source}:{e.line}: unknown head {e.head!r} "
                            f"(the model has: {', '.join(by_name)})")
        elif isinstance(e.label, tuple) and not head.multi_label:
            problems.append(f"{e.source}:{e.line}: head {e.head!r} is single-label: give one "
                            "label, not a list")
        else:
            for lab in e.label_set:
                if lab not in head.labels:
                    problems.append(f"{e.source}:{e.line}: head {e.head!r} has no label "
                                    f"{lab!r} (its labels: {', '.join(head.labels)})")
    return problems


def metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over all ``labels``), per-label precision / recall / F1 / support,
    and the confusion matrix (rows: true label, columns: predicted label)."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        matrix[index[t]][index[p]] += 1
    per_label: dict[str, dict[str, float]] = {}
    for i, lab in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(len(labels)))
        actual = sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(y_true)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"n": n, "accuracy": correct / n if n else 0.0,
            "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels) if labels else 0.0,
            "per_label": per_label, "confusion": matrix, "labels": list(labels)}


def multilabel_metrics(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]],
                       labels: Sequence[str]) -> dict[str, Any]:
    """A multi-label head's figures over texts (each with its set of true and predicted
    labels): per-label precision / recall / F1 / support, macro-F1 (the labels' mean F1),
    exact-match accuracy, and per label the 2x2 confusion ``[[tn, fp], [fn, tp]]``."""
    per_label: dict[str, dict[str, float]] = {}
    confusion = []
    truth = [set(t) for t in y_true]
    preds = [set(p) for p in y_pred]
    for lab in labels:
        tp = sum(1 for t, p in zip(truth, preds) if lab in t and lab in p)
        fp = sum(1 for t, p in zip(truth, preds) if lab not in t and lab in p)
        fn = sum(1 for t, p in zip(truth, preds) if lab in t and lab not in p)
        tn = len(truth) - tp - fp - fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        confusion.append([[tn, fp], [fn, tp]])
    n = len(truth)
    exact = sum(1 for t, p in zip(truth, preds) if t == p)
    return {"n": n, "accuracy": exact / n if n else 0.0,
            "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels) if labels else 0.0,
            "per_label": per_label, "confusion": confusion, "labels": list(labels)}


@dataclass
class HeadReport:
    """One head's figures. ``confusion``: rows true label, columns predicted, for a
    single-label head; for a multi-label head one 2x2 ``[[tn, fp], [fn, tp]]`` per label."""

    head: str
    labels: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, dict[str, float]]
    confusion: list[Any]
    kind: str = SINGLE_LABEL

    @property
    def multi_label(self) -> bool:
        return self.kind == MULTI_LABEL

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "labels": self.labels, "n": self.n, "accuracy": self.accuracy,
                "macro_f1": self.macro_f1, "per_label": self.per_label, "confusion": self.confusion,
                "kind": self.kind}


@dataclass
class EvalReport:
    model: str
    heads: dict[str, HeadReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_macro_f1(self) -> float:
        return sum(h.macro_f1 for h in self.heads.values()) / len(self.heads) if self.heads else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "mean_macro_f1": self.mean_macro_f1, "seconds": self.seconds,
                "heads": {k: v.to_dict() for k, v in self.heads.items()}}

    def render(self) -> str:
        lines = [f"model: {self.model}"]
        for h in self.heads.values():
            what = " (multi-label: exact-match accuracy, a label predicted at p >= 0.5)" \
                if h.multi_label else ""
            lines.append(f"  head {h.head}: n={h.n} accuracy={h.accuracy:.4f} "
                         f"macro-F1={h.macro_f1:.4f}{what}")
            width = max(len(lab) for lab in h.labels)
            lines.append(f"    {'label':<{width}}  precision  recall     f1  support")
            for lab in h.labels:
                m = h.per_label[lab]
                lines.append(f"    {lab:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  "
                             f"{m['f1']:.4f}  {int(m['support']):7d}")
            if h.multi_label:
                lines.append("    confusion per label [[tn, fp], [fn, tp]]: " + ", ".join(
                    f"{lab} {c}" for lab, c in zip(h.labels, h.confusion)))
            else:
                lines.append(f"    confusion (rows true, columns predicted): {h.confusion}")
        lines.append(f"  mean macro-F1 over heads: {self.mean_macro_f1:.4f}")
        return "\n".join(lines)


def report_from_predictions(model: str, examples: Sequence[Example],
                            predictions: Sequence[str | tuple[str, ...]],
                            heads: Sequence[Head]) -> EvalReport:
    """Per head, the figures of ``predictions`` (one per example). A multi-label head counts
    each text once, with the union of the labels its examples name."""
    report = EvalReport(model=model)
    for head in heads:
        idx = [i for i, e in enumerate(examples) if e.head == head.name]
        if not idx:
            continue
        if head.multi_label:
            truth: dict[str, set[str]] = {}
            pred: dict[str, tuple[str, ...]] = {}
            for i in idx:
                truth.setdefault(examples[i].text, set()).update(examples[i].label_set)
                p = predictions[i]
                pred[examples[i].text] = p if isinstance(p, tuple) else (p,)
            texts = list(truth)
            m = multilabel_metrics([truth[t] for t in texts], [pred[t] for t in texts],
                                   head.labels)
        else:
            m = metrics([examples[i].label for i in idx], [predictions[i] for i in idx],
                        head.labels)
        report.heads[head.name] = HeadReport(head=head.name, labels=list(head.labels), n=m["n"],
                                             accuracy=m["accuracy"], macro_f1=m["macro_f1"],
                                             per_label=m["per_label"], confusion=m["confusion"],
                                             kind=head.kind)
    return report


def predicted_label(head_scores: Any) -> str | tuple[str, ...]:
    """The prediction of one head for one text: its label with the highest score, or for a
    multi-label head the labels scoring at least 0.5."""
    return head_scores.predicted


def evaluate(classifier: Any, examples: Sequence[Example], *, model: str = "",
             rename: Mapping[str, str] | None = None) -> EvalReport:
    """Score ``examples`` with ``classifier`` (production chunking) and report per head.

    ``rename``: classifier head name -> data head name (for a single-head source model whose
    folder name differs from the bundle's head name).
    """
    heads = list(classifier.heads)
    if rename:
        heads = [replace(h, name=rename.get(h.name, h.name)) for h in heads]
    wanted = {h.name for h in heads}
    examples = [e for e in examples if e.head in wanted]
    problems = check_examples(examples, heads)
    if problems:
        raise DataError(problems)
    start = time.perf_counter()
    texts = sorted({e.text for e in examples})
    position = {t: i for i, t in enumerate(texts)}
    scored = classifier.classify(texts)
    back = {h.name: orig.name for h, orig in zip(heads, classifier.heads)}
    preds = []
    for e in examples:
        preds.append(predicted_label(scored[position[e.text]].heads[back[e.head]]))
    report = report_from_predictions(model or getattr(classifier, "name", ""), examples,
                                     preds, heads)
    report.seconds = time.perf_counter() - start
    return report


def _top_prediction(report: HeadReport) -> tuple[str, float]:
    """The label a head predicts most often and the share of texts it predicts it for."""
    counts = [sum(row[j] for row in report.confusion) for j in range(len(report.labels))]
    j = max(range(len(counts)), key=counts.__getitem__)
    return report.labels[j], counts[j] / report.n if report.n else 0.0


def collapse_warnings(merged: EvalReport, originals: Mapping[str, EvalReport] | None = None, *,
                      share: float = 0.95) -> list[str]:
    """A warning per head that predicts one label for at least ``share`` of its texts where its
    source model did not (without a source: where the true labels are not that skewed): the
    head has collapsed, as plain merges of full fine-tunes often make it."""
    out = []
    for head, rep in merged.heads.items():
        if rep.multi_label:  # not one label per text: no single-label collapse to look for
            continue
        label, got = _top_prediction(rep)
        if got < share:
            continue
        src = (originals or {}).get(head)
        src_head = src.heads.get(head) if src is not None else None
        if src_head is not None:
            ref_label, ref = _top_prediction(src_head)
            if ref >= share:
                continue
            base = f"its source predicts {ref_label!r} for at most {ref:.0%}"
        else:
            truth = max(sum(row) for row in rep.confusion) / rep.n if rep.n else 1.0
            if truth >= share:
                continue
            base = f"the data's most common label covers {truth:.0%}"
        out.append(f"head {head!r} predicts {label!r} for {got:.0%} of its {rep.n} texts, where "
                   f"{base}: the merged head has collapsed (try head_mode: refit, or distil)")
    for w in out:
        logger.warning("%s", w)
    return out


def comparison_table(merged: EvalReport, originals: Mapping[str, EvalReport]) -> list[dict[str, Any]]:
    """Rows per head: original vs merged macro-F1 and accuracy (the paper's Table 1)."""
    rows = []
    for head, report in merged.heads.items():
        orig = originals.get(head)
        o = orig.heads.get(head) if orig else None
        rows.append({"head": head, "n": report.n,
                     "original_f1": o.macro_f1 if o else None, "merged_f1": report.macro_f1,
                     "original_acc": o.accuracy if o else None, "merged_acc": report.accuracy})
    return rows


def render_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "   -  " if v is None else f"{v:.4f}"

    lines = [f"{'head':<16} {'n':>6}  {'original F1':>11}  {'merged F1':>9}  {'delta':>7}  "
             f"{'orig acc':>8}  {'merged acc':>10}"]
    for r in rows:
        delta = None if r["original_f1"] is None else r["merged_f1"] - r["original_f1"]
        lines.append(f"{r['head']:<16} {r['n']:>6}  {fmt(r['original_f1']):>11}  "
                     f"{fmt(r['merged_f1']):>9}  {('   -  ' if delta is None else f'{delta:+.4f}'):>7}  "
                     f"{fmt(r['original_acc']):>8}  {fmt(r['merged_acc']):>10}")
    have = [r for r in rows if r["original_f1"] is not None]
    if rows:
        avg_m = sum(r["merged_f1"] for r in rows) / len(rows)
        avg_o = sum(r["original_f1"] for r in have) / len(have) if have else None
        lines.append(f"{'average':<16} {'':>6}  {fmt(avg_o):>11}  {fmt(avg_m):>9}  "
                     f"{('   -  ' if avg_o is None else f'{avg_m - avg_o:+.4f}'):>7}")
    return "\n".join(lines)
