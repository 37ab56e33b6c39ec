"""Benchmarks (``guardmerge bench ...``). Not tests: they print figures measured in one run."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def _base_sized_bundle(folder: Path, *, layers: int, hidden: int, heads: int, intermediate: int,
                       head_layout: dict[str, list[str]]) -> tuple[Path, Any]:
    from .testing import bert_base_vocab, build_bundle, build_tokenizer

    tok = build_tokenizer(bert_base_vocab(), extra_words=())
    path = build_bundle(folder, head_layout, tokenizer=tok, seed=0, hidden=hidden, layers=layers,
                        attention_heads=heads, intermediate=intermediate)
    return path, tok


def runtime(*, layers: int = 12, hidden: int = 768, heads: int = 12, intermediate: int = 3072,
            repeats: int = 5, long_tokens: int = 20000, dtypes: Sequence[str] = ("float32", "bfloat16"),
            threads: int | None = None) -> dict[str, Any]:
    from .classifier import BundleClassifier
    from .testing import bert_base_vocab, random_text

    if threads:
        torch.set_num_threads(threads)
    words = bert_base_vocab()[:20000]
    layout = {"jailbreak": ["benign", "jailbreak"], "toxicity": ["normal", "offensive", "hateful"],
              "spam": ["ham", "spam"]}
    tmp = Path(tempfile.mkdtemp(prefix="guardmerge-bench-"))
    results: dict[str, Any] = {"machine": _machine()}
    try:
        t0 = time.perf_counter()
        bundle, _ = _base_sized_bundle(tmp / "bundle", layers=layers, hidden=hidden, heads=heads,
                                       intermediate=intermediate, head_layout=layout)
        print(f"# guardmerge bench runtime: {_machine()}")
        print(f"# model: BERT {layers} layers, hidden {hidden}, vocab 30522, 3 heads / 7 labels, "
              f"random weights built locally in {time.perf_counter() - t0:.1f}s")
        window_text = random_text(510, seed=1, words=words)
        long_text = random_text(long_tokens, seed=2, words=words)
        print(f"{'dtype':<9} {'batch':>5} {'ms/window':>10} {'windows/s':>10} {'ms/call':>9}")
        for dtype in dtypes:
            for batch in (1, 8):
                clf = BundleClassifier.from_pretrained(bundle, dtype=dtype, batch_size=batch)
                texts = [window_text] * batch
                assert clf.classify(texts[:1])[0].n_tokens == 510
                clf.classify(texts)  # warm-up
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    clf.classify(texts)
                    times.append(time.perf_counter() - t)
                call = statistics.median(times)
                results[f"{dtype}/batch{batch}"] = {"ms_per_window": 1000 * call / batch,
                                                    "windows_per_s": batch / call}
                print(f"{dtype:<9} {batch:>5} {1000 * call / batch:>10.1f} {batch / call:>10.1f} "
                      f"{1000 * call:>9.1f}")
        f32 = results.get("float32/batch8", {}).get("windows_per_s")
        bf16 = results.get("bfloat16/batch8", {}).get("windows_per_s")
        if f32 and bf16:
            print(f"bf16 / fp32 throughput at batch 8: {bf16 / f32:.2f}x")
        print(f"one {long_tokens:,}-token text end to end (tokenise, windows, batched forward, "
              "aggregate):")
        for dtype in dtypes:
            clf = BundleClassifier.from_pretrained(bundle, dtype=dtype, batch_size=8)
            clf.classify([window_text])
            t = time.perf_counter()
            r = clf.classify([long_text])[0]
            el = time.perf_counter() - t
            results[f"{dtype}/long"] = {"seconds": el, "windows": len(r.windows)}
            print(f"  {dtype:<9} {r.n_tokens:,} tokens, {len(r.windows)} windows: {el:.2f}s "
                  f"({r.n_tokens / el:,.0f} tokens/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _peak_rss_mb_of_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def merge(*, layers: int = 12, hidden: int = 768, methods: Sequence[str] = ("ties", "dare_ties"),
          mergekit: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    from ._merge_bench import run as run_merge_bench

    return run_merge_bench(layers=layers, hidden=hidden, methods=methods, mergekit=mergekit,
                           workdir=workdir)
