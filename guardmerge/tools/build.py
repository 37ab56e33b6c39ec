"""Build real guard heads offline: fine-tune source classifiers from the packaged MiniLM encoder
on packaged labelled text, HM3-merge them, and compare each source with the merged bundle.

Everything is cached under the output folder: a second run only re-reads results. Splits are
fixed by a hash of each text (``datasets.split_of``); the test split is never trained on, and
merge choices (method, density search) are made on the validation split only.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._atomic import atomic_directory
from .._progress import progress as progress_bar
from ..bundle import save_tokenizer
from . import datasets as ds

__all__ = ["HeadData", "head_datasets", "finetune", "build_guards", "task_vector_norms",
           "HEAD_LABELS"]

HEAD_LABELS = {"jailbreak": ["benign", "jailbreak"],
               "toxicity": ["normal", "offensive", "hateful"],
               "sentiment": ["negative", "positive"]}

_PLOT_TEMPLATES = [
    "Here is the plot of a film I am writing about. What genre would you call it?\n\n{t}",
    "Summarise this movie plot in two sentences:\n\n{t}",
    "Can you suggest a better title for a film with this story?\n\n{t}",
    "Translate the following synopsis into simple English for a language learner:\n\n{t}",
]
_REVIEW_TEMPLATES = [
    "Summarise what these critics think of the film:\n\n{t}",
    "Here are some reviews from my blog. Fix any grammar mistakes and keep the tone:\n\n{t}",
    "Which of these reviews is the most useful to a reader, and why?\n\n{t}",
]


@dataclass
class HeadData:
    name: str
    labels: list[str]
    train: list[tuple[str, str]] = field(default_factory=list)
    val: list[tuple[str, str]] = field(default_factory=list)
    test: list[tuple[str, str]] = field(default_factory=list)

    def add(self, text: str, label: str, split_key: str | None = None) -> None:
        getattr(self, ds.split_of(split_key or text)).append((text, label))

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split in ("train", "val", "test"):
            c: dict[str, int] = {}
            for _, lab in getattr(self, split):
                c[lab] = c.get(lab, 0) + 1
            out[split] = c
        return out


def _sample(items: list[Any], n: int, seed: int) -> list[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def head_datasets(scale: float = 1.0, seed: int = 0) -> dict[str, HeadData]:
    """The three heads' labelled data (``scale`` < 1 takes a fraction, for quick runs)."""
    n = lambda k: max(4, int(k * scale))  # noqa: E731
    openers = ds.chat_openers()
    plots = ds.movie_plots()
    reviews = ds.rotten_tomatoes()
    heads = {name: HeadData(name, labels) for name, labels in HEAD_LABELS.items()}

    jb = heads["jailbreak"]
    for item in _sample(ds.jailbreak_prompts(), n(664), seed):
        jb.add(item.text, "jailbreak")
    for item in _sample(openers, n(749), seed):
        jb.add(item.text, "benign")
    # long benign prompts (template-based: no package ships real long benign prompts)
    for i, item in enumerate(_sample(plots, n(500), seed + 1)):
        jb.add(_PLOT_TEMPLATES[i % len(_PLOT_TEMPLATES)].format(t=item.text), "benign", item.text)
    shuffled = _sample(reviews, n(1500), seed + 2)
    for i in range(0, len(shuffled) - 5, 5):
        group = shuffled[i:i + 5]
        text = "\n".join(f"- {g.text}" for g in group)
        jb.add(_REVIEW_TEMPLATES[(i // 5) % len(_REVIEW_TEMPLATES)].format(t=text), "benign",
               group[0].text)

    tox = heads["toxicity"]
    for item in _sample(ds.toxicity_prompts(), n(623), seed):
        tox.add(item.text, item.label)
    for item in _sample(openers, n(450), seed + 3):
        tox.add(item.text, "normal")
    for item in _sample(reviews, n(300), seed + 4):
        tox.add(item.text, "normal")

    sent = heads["sentiment"]
    pos = [r for r in reviews if r.label == "positive"]
    neg = [r for r in reviews if r.label == "negative"]
    for item in _sample(pos, n(1500), seed + 5) + _sample(neg, n(1500), seed + 6):
        sent.add(item.text, item.label)
    return heads


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def finetune(base: Path, train: Sequence[tuple[str, str]], labels: Sequence[str], out: Path, *,
             epochs: int = 2, lr: float = 8e-5, batch_size: int = 32, max_length: int = 128,
             seed: int = 0, progress: bool = True, desc: str = "fine-tune") -> dict[str, Any]:
    """Fine-tune a sequence classifier from ``base`` (cached by data + settings in build.json)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = {"base": str(base), "labels": list(labels), "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "max_length": max_length, "seed": seed,
                "data": _key(list(train))}
    key = _key(settings)
    record = out / "build.json"
    if record.exists():
        done = json.loads(record.read_text())
        if done.get("key") == key:
            return {**done, "cached": True}
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    id2label = dict(enumerate(labels))
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model.train()
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(train)
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    with progress_bar(steps, desc, enabled=progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for b in range(0, n, batch_size):
                batch = [train[i] for i in order[b:b + batch_size]]
                enc = tok([t for t, _ in batch], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
                y = torch.tensor([index[lab] for _, lab in batch])
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(**enc).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix_str(f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}",
                                    refresh=False)
    seconds = time.perf_counter() - start
    model.eval()
    info = {"key": key, "settings": settings, "seconds": seconds, "train_examples": n,
            "steps": steps, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        (tmp / "build.json").write_text(json.dumps(info, indent=2))
    return {**info, "cached": False}


def task_vector_norms(base: Path, sources: Sequence[Path]) -> list[float]:
    """L2 norm of each source's task vector over the encoder (output layers excluded)."""
    from ..merge import MergePlan

    plan = MergePlan({"base": str(base), "method": "task_arithmetic",
                      "models": [{"model": str(s)} for s in sources]})
    try:
        totals = [0.0] * len(sources)
        for name in plan.names:
            if name in plan.head_tensors or not plan.specs[name].dtype.is_floating_point:
                continue
            b = plan.base_tensor(name)
            for i in range(len(plan.sources)):
                totals[i] += float((plan.source_tensor(i, name).float() - b).pow(2).sum())
    finally:
        plan.close()
    return [math.sqrt(t) for t in totals]


def _write_jsonl(path: Path, heads: dict[str, HeadData], split: str) -> Path:
    rows = [{"text": t, "head": h.name, "label": lab} for h in heads.values()
            for t, lab in getattr(h, split)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def build_guards(out: str | Path = ".guardmerge-cache/guards", *, scale: float = 1.0,
                 base: Path | None = None, heads: dict[str, HeadData] | None = None,
                 epochs: dict[str, int] | None = None, search_trials: int = 12,
                 progress: bool = True, log: Callable[[str], None] = print,
                 max_length: int = 128) -> dict[str, Any]:
    """The whole pipeline; returns a summary (also written to ``out/summary.json``)."""
    from ..classifier import BundleClassifier
    from ..merge import (SearchOptions, comparison_table, evaluate, load_examples, merge,
                         render_comparison, run_search)

    out = Path(out)
    summary_path = out / "summary.json"
    base = base or ds.minilm_path()
    heads = heads or head_datasets(scale)
    epochs = epochs or {"jailbreak": 2, "toxicity": 3, "sentiment": 3}
    data_dir = out / "data"
    files = {split: _write_jsonl(data_dir / f"{split}.jsonl", heads, split)
             for split in ("train", "val", "test")}
    fingerprint = _key({"base": str(base), "data": [h.counts() for h in heads.values()],
                        "test": (data_dir / "test.jsonl").read_text()[:100000],
                        "epochs": epochs, "trials": search_trials})
    if summary_path.exists():
        old = json.loads(summary_path.read_text())
        if old.get("fingerprint") == fingerprint and Path(old.get("bundle", "")).exists():
            log(f"guard bundle up to date: {old['bundle']} (cached; delete {out} to rebuild)")
            return old
    summary: dict[str, Any] = {"fingerprint": fingerprint, "base": str(base), "heads": {}}
    sources = {}
    for name, h in heads.items():
        info = finetune(base, h.train, h.labels, out / "sources" / name, epochs=epochs[name],
                        progress=progress, desc=f"train {name:<9}",
                        max_length=max_length)
        sources[name] = out / "sources" / name
        summary["heads"][name] = {"labels": h.labels, "counts": h.counts(),
                                  "train_seconds": info["seconds"], "cached": info["cached"]}
        log(f"{name}: {info['train_examples']} examples, {info['steps']} steps, "
            f"{info['seconds']:.0f}s{' (cached)' if info['cached'] else ''}")

    models = [{"model": str(sources[n]), "head": n} for n in heads]
    # task vectors differ in size by an order of magnitude (epochs, data); "balanced" weights
    # scale each to the mean norm so one task does not drown the others
    norms = task_vector_norms(base, [sources[n] for n in heads])
    mean_norm = sum(norms) / len(norms)
    balanced = [{**m, "weight": round(mean_norm / nrm, 4)} for m, nrm in zip(models, norms)]
    summary["task_vector_norms"] = dict(zip(heads, norms))
    log("task-vector norms: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(heads, norms)))
    val = load_examples([files["val"]])
    test = load_examples([files["test"]])
    candidates: dict[str, dict[str, Any]] = {
        "soup": {"method": "linear", "head_mode": "merge"},
        "soup (owner heads)": {"method": "linear", "head_mode": "owner"},
        "ties 0.5": {"method": "ties", "head_mode": "merge", "parameters": {"density": 0.5}},
        "ties 0.5 (owner heads)": {"method": "ties", "head_mode": "owner", "parameters": {"density": 0.5}},
        "dare_ties 0.5": {"method": "dare_ties", "head_mode": "merge", "parameters": {"density": 0.5}},
        "dare_ties 0.5 (owner heads)": {"method": "dare_ties", "head_mode": "owner",
                                        "parameters": {"density": 0.5}},
        "ties 0.3, lambda 2, balanced": {"method": "ties", "head_mode": "merge",
                                         "parameters": {"density": 0.3, "lambda": 2.0},
                                         "models": balanced},
        "dare_ties 0.3, lambda 2, balanced": {"method": "dare_ties", "head_mode": "merge",
                                              "parameters": {"density": 0.3, "lambda": 2.0},
                                              "models": balanced},
    }
    val_scores: dict[str, float] = {}
    bundles: dict[str, Path] = {}
    for label, cfg in candidates.items():
        recipe = {"base": str(base), "seed": 0, "models": models, **cfg}
        path = out / "bundles" / label.replace(" ", "_").replace("(", "").replace(")", "")
        bundles[label] = merge(recipe, path, overwrite=True, progress=progress)
        clf = BundleClassifier.from_pretrained(path, dtype="auto")
        val_scores[label] = evaluate(clf, val).mean_macro_f1
        log(f"merged {label:<28} validation mean macro-F1 {val_scores[label]:.4f}")
    if search_trials:
        # search the densities of the best configuration so far (on validation data only)
        lead = max(val_scores, key=lambda k: val_scores[k])
        cfg = candidates[lead]
        search_recipe = {"base": str(base), "method": "dare_ties", "head_mode": cfg["head_mode"],
                         "parameters": {"lambda": cfg.get("parameters", {}).get("lambda", 1.0)},
                         "models": [{k: v for k, v in m.items() if k != "density"}
                                    for m in cfg.get("models", models)]}
        search_dir = out / "search" / _key(search_recipe)[:12]
        options = SearchOptions(trials=search_trials, seed=0, beta=(2.0, 5.0), dtype="auto",
                                resume=(search_dir / "trials.jsonl").exists(),
                                progress=progress, compare_sources=False, report=True)
        res = run_search(search_recipe, [files["val"]], search_dir, options)
        label = f"dare_ties search ({search_trials} trials)"
        bundles[label] = Path(res["best_bundle"])
        val_scores[label] = res["best"]["score"]
        log(f"merged {label:<28} validation mean macro-F1 {val_scores[label]:.4f} "
            f"(densities {', '.join(f'{d:.2f}' for d in res['best']['densities'])})")
    chosen = max(val_scores, key=lambda k: val_scores[k])
    # the comparison on the held-out test split
    originals = {}
    for name in heads:
        clf = BundleClassifier.from_pretrained(sources[name], dtype="auto")
        originals[name] = evaluate(clf, test, model=name, rename={clf.heads[0].name: name})
    tables = {}
    for label, path in bundles.items():
        rep = evaluate(BundleClassifier.from_pretrained(path, dtype="auto"), test, model=label)
        tables[label] = comparison_table(rep, originals)
    # merged vs separate inference time, one run, same texts
    texts = sorted({e.text for e in test})
    sep_clfs = [BundleClassifier.from_pretrained(sources[n], dtype="auto") for n in heads]
    merged_clf = BundleClassifier.from_pretrained(bundles[chosen], dtype="auto")
    for c in sep_clfs + [merged_clf]:
        c.classify(texts[:16])
    t = time.perf_counter()
    for c in sep_clfs:
        c.classify(texts)
    separate_s = time.perf_counter() - t
    t = time.perf_counter()
    merged_clf.classify(texts)
    merged_s = time.perf_counter() - t
    final = out / "bundle"
    with atomic_directory(final, overwrite=True) as tmp:
        shutil.copytree(bundles[chosen], tmp, dirs_exist_ok=True)
    summary.update({"bundle": str(final), "chosen": chosen, "validation": val_scores,
                    "tables": tables, "timing": {"texts": len(texts), "separate_s": separate_s,
                                                 "merged_s": merged_s,
                                                 "ratio": merged_s / separate_s},
                    "test_file": str(files["test"])})
    lines = []
    for label, rows in tables.items():
        lines.append(f"## {label}{'  <- chosen on validation' if label == chosen else ''}")
        lines.append(render_comparison(rows))
        lines.append("")
    lines.append(f"inference on {len(texts)} test texts: 3 separate models {separate_s:.1f}s, "
                 f"one merged bundle {merged_s:.1f}s (ratio {merged_s / separate_s:.2f})")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    summary_path.write_text(json.dumps(summary, indent=2))
    log("\n".join(lines))
    return summary
