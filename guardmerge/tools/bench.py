"""Benchmarks (``guardmerge bench ...``). Not tests: they print figures measured in one run,
with every compared variant measured side by side (ratios, not absolute targets)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["runtime", "heads", "merge", "middleware", "search", "serve", "cli"]


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def _base_sized_bundle(folder: Path, *, layers: int, hidden: int, heads: int, intermediate: int,
                       head_layout: dict[str, list[str]]) -> tuple[Path, Any]:
    from ..testing import bert_base_vocab, build_bundle, build_tokenizer

    tok = build_tokenizer(bert_base_vocab(), extra_words=())
    path = build_bundle(folder, head_layout, tokenizer=tok, seed=0, hidden=hidden, layers=layers,
                        attention_heads=heads, intermediate=intermediate)
    return path, tok


def runtime(*, layers: int = 12, hidden: int = 768, heads: int = 12, intermediate: int = 3072,
            repeats: int = 5, long_tokens: int = 20000, dtypes: Sequence[str] = ("float32", "bfloat16"),
            threads: int | None = None) -> dict[str, Any]:
    from ..classifier import BundleClassifier
    from ..testing import bert_base_vocab, random_text

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


def heads(*, family: str = "deberta-v2", layers: int = 12, hidden: int = 768,
          attention_heads: int = 12, intermediate: int = 3072, tokens: int = 128,
          batch: int = 8, repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """What N heads cost: one encoder pass plus N small heads. A BERT-base-sized guard model of
    ``family`` with random weights (built in memory, no files), one head (a plain bundle) and
    three heads with their own head modules (a per-head bundle); per batch of ``batch`` windows
    of ``tokens`` tokens: the encoder pass alone, the heads alone (on the encoder's output), the
    whole forward, and what N separate models would cost (N x the one-head forward)."""
    from .._model import guard_skeleton
    from ..classifier import resolve_dtype
    from ..families import family_for
    from ..labels import Head
    from ..testing import tiny_config

    fam = family_for(family)
    torch_dtype = resolve_dtype(dtype)
    layouts = {1: [("jailbreak", 2)], 3: [("jailbreak", 2), ("toxicity", 6), ("spam", 2)]}
    print(f"# guardmerge bench heads: {_machine()}")
    print(f"# {family}: {layers} layers, hidden {hidden}, random weights in memory, {dtype}; "
          f"a batch of {batch} windows x {tokens} tokens; best of {repeats} runs")
    print(f"{'heads':>5} {'layout':<9} {'encoder ms':>10} {'forward ms':>10} {'heads ms':>9} "
          f"{'heads %':>8} {'N models ms':>11}")
    results: dict[str, Any] = {"machine": _machine()}
    gen = torch.Generator().manual_seed(0)
    single_forward = None
    for n, layout in layouts.items():
        offset, hs = 0, []
        for i, (name, size) in enumerate(layout):
            hs.append(Head(name, tuple(f"l{j}" for j in range(size)), offset,
                           modules=f"heads.{i}." if n > 1 and fam.has_head_modules else None))
            offset += size
        config = tiny_config(30522, offset, family=family, hidden=hidden, layers=layers,
                             attention_heads=attention_heads, intermediate=intermediate,
                             max_position=max(512, tokens))
        model = guard_skeleton(config, fam, hs, dtype=torch_dtype)
        ids = torch.randint(5, 30000, (batch, tokens), generator=gen)
        mask = torch.ones_like(ids)
        types = torch.zeros_like(ids)

        def timed(fn: Any) -> float:
            with torch.inference_mode():
                fn()  # warm-up
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
            return min(times)  # the best run: the least disturbed by other work on the machine

        with torch.inference_mode():
            x = model.read(ids, mask, types)
        enc = timed(lambda: model.read(ids, mask, types))
        head = timed(lambda: model.heads_logits(x))  # the heads alone, on the encoder's output
        full = timed(lambda: model(ids, mask, types))
        if n == 1:
            single_forward = full
        separate = n * (single_forward or full)
        row = {"encoder_ms": enc * 1e3, "forward_ms": full * 1e3,
               "heads_ms": head * 1e3, "heads_share": head / full,
               "n_models_ms": separate * 1e3, "layout": "per_head" if n > 1 else "plain"}
        results[f"{n}_heads"] = row
        print(f"{n:>5} {row['layout']:<9} {row['encoder_ms']:>10.1f} {row['forward_ms']:>10.1f} "
              f"{row['heads_ms']:>9.2f} {100 * row['heads_share']:>7.2f}% "
              f"{row['n_models_ms']:>11.1f}")
        del model
    one, three = results["1_heads"], results["3_heads"]
    print(f"3 heads / 1 head, whole forward: {three['forward_ms'] / one['forward_ms']:.3f}x "
          f"(3 separate models: {three['n_models_ms'] / one['forward_ms']:.1f}x)")
    return results


def merge(*, layers: int = 12, hidden: int = 768, methods: Sequence[str] = ("ties", "dare_ties"),
          mergekit: str | None = None, workdir: str | None = None,
          repeat: int = 3) -> dict[str, Any]:
    from .merge_bench import run as run_merge_bench

    return run_merge_bench(layers=layers, hidden=hidden, methods=methods, mergekit=mergekit,
                           workdir=workdir, repeat=repeat)


def serve(**kwargs: Any) -> dict[str, Any]:
    """The proxy: latency added over direct, throughput, batching on vs off (``serve_bench``)."""
    from .serve_bench import run as run_serve_bench

    return run_serve_bench(**kwargs)


def middleware(*, calls: int = 2000, turns: int = 20) -> dict[str, Any]:
    """Per-call overhead of the guard wrapper (trivial classifier, in-process upstream) and the
    forward passes the history cache saves over a multi-turn conversation."""
    import httpx

    from .._http import ChatClient
    from ..classifier import BundleClassifier, FunctionClassifier
    from ..client import guard_client
    from ..guard import Guard
    from ..policy import Policy
    from ..testing import build_tokenizer, build_trigger_model, random_text, write_bundle

    body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Sure, here it is."}}]})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "application/json"})

    policy = Policy.from_yaml("""
input: {roles: [user, assistant], rules: [{head: jailbreak, labels: [jailbreak], flag: 0.5, block: 0.9}]}
output: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}
""")
    trivial = FunctionClassifier({"jailbreak": ["benign", "jailbreak"]},
                                 lambda t: {"jailbreak": {"jailbreak": 0.01}})
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    results: dict[str, Any] = {"machine": _machine()}
    print(f"# guardmerge bench middleware: {_machine()}")
    print(f"# upstream: in-process httpx.MockTransport (no network); classifier: a trivial "
          f"FunctionClassifier; {calls} calls each; overhead = guarded - plain, per call")
    clients: dict[str, Any] = {"guardmerge ChatClient": lambda: ChatClient(
        "http://upstream.invalid/v1", transport=httpx.MockTransport(handler))}
    try:
        import openai

        clients["openai.OpenAI"] = lambda: openai.OpenAI(
            base_url="http://upstream.invalid/v1", api_key="x", max_retries=0,
            http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    except ImportError:  # pragma: no cover - openai is a dev/test extra
        pass
    guard_only = Guard(trivial, policy, cache_size=0)
    answer = [{"role": "assistant", "content": "Sure, here it is."}]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            guard_only.check(messages)
            guard_only.check(answer, "output")
        best = min(best, (time.perf_counter() - t) / calls)
    results["guard checks"] = {"ms": best * 1000}
    print(f"{'Guard.check alone':<22} {best * 1e3:7.3f} ms per input + output check (the floor "
          "of the wrapper's cost)")
    for label, make in clients.items():
        plain = make()
        guarded = guard_client(make(), Guard(trivial, policy, cache_size=0))
        for c in (plain, guarded):
            for _ in range(50):
                c.chat.completions.create(model="m", messages=messages)
        timings = {"plain": float("inf"), "guarded": float("inf")}
        for _ in range(5):  # alternating rounds, best of each: a busy machine's noise hits both
            for name, c in (("plain", plain), ("guarded", guarded)):
                t = time.perf_counter()
                for _ in range(calls):
                    c.chat.completions.create(model="m", messages=messages)
                timings[name] = min(timings[name], (time.perf_counter() - t) / calls)
        overhead = timings["guarded"] - timings["plain"]
        results[label] = {**timings, "overhead_ms": overhead * 1000}
        print(f"{label:<22} plain {timings['plain'] * 1e3:7.3f} ms/call   guarded "
              f"{timings['guarded'] * 1e3:7.3f} ms/call   overhead {overhead * 1e3:6.3f} ms/call "
              f"(input + output check)")

    tmp = Path(tempfile.mkdtemp(prefix="guardmerge-bench-"))
    try:
        tok = build_tokenizer()
        model, heads = build_trigger_model(tok)
        bundle = write_bundle(tmp / "b", model, tok, heads)
        print(f"# history cache: a {turns}-turn conversation, the client resends the whole "
              "history each turn; input roles user + assistant; tiny local bundle")
        for cache_size in (1024, 0):
            clf = BundleClassifier.from_pretrained(bundle, batch_size=8)
            guard = Guard(clf, policy, cache_size=cache_size)
            history: list[dict[str, str]] = []
            t = time.perf_counter()
            for turn in range(turns):
                history.append({"role": "user", "content": random_text(60, seed=turn)})
                guard.check(history)
                history.append({"role": "assistant", "content": random_text(80, seed=999 + turn)})
            el = time.perf_counter() - t
            label = "with cache" if cache_size else "no cache"
            results[label] = {"forward_passes": clf.stats.forward_passes,
                              "windows": clf.stats.windows, "seconds": el}
            print(f"{label:<11} forward passes {clf.stats.forward_passes:4d}   windows scored "
                  f"{clf.stats.windows:4d}   {el * 1e3:7.1f} ms")
        saved = results["no cache"]["forward_passes"] - results["with cache"]["forward_passes"]
        print(f"cache saved {saved} of {results['no cache']['forward_passes']} forward passes "
              f"({results['no cache']['windows'] - results['with cache']['windows']} of "
              f"{results['no cache']['windows']} windows)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def search(*, texts: int = 1000, words: int = 40, trials: int = 3, layers: int = 12,
           hidden: int = 768, dtypes: Sequence[str] = ("float32", "bfloat16"),
           workdir: str | None = None, screen: int = 100, search_trials: int = 500,
           finalists: int = 0) -> dict[str, Any]:
    """Trials per hour of the density search: two BERT-base-sized sources, ``texts`` texts;
    every trial on all texts, and with screening (``screen`` texts first, the best 5% on all)."""
    from .merge_bench import build_inputs
    from ..merge.evaluation import Example
    from ..merge.recipe import MergeRecipe
    from ..merge.search import SearchOptions, TrialContext, screen_subset, trial_params
    from ..testing import bert_base_vocab, random_text

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="guardmerge-bench-"))
    results: dict[str, Any] = {"machine": _machine()}
    try:
        paths = build_inputs(root / f"inputs-{layers}x{hidden}", layers=layers, hidden=hidden)
        vocab = bert_base_vocab()[:20000]
        labels = {"jailbreak": ["benign", "jailbreak"], "hate": ["hate speech", "normal", "offensive"]}
        examples = []
        for i in range(texts):
            head = "jailbreak" if i % 2 == 0 else "hate"
            examples.append(Example(random_text(words, seed=i, words=vocab), head,
                                    labels[head][(i // 2) % len(labels[head])]))
        recipe = MergeRecipe.from_dict({
            "base": str(paths["base"]), "method": "dare_ties",
            "models": [{"model": str(paths["jb"]), "head": "jailbreak", "labels": labels["jailbreak"]},
                       {"model": str(paths["hate"]), "head": "hate", "labels": labels["hate"]}]})
        spec = SearchOptions(trials=search_trials, seed=0, screen=screen, finalists=finalists)
        screen_idx = screen_subset(examples, screen, spec.seed) if screen else []
        k_final = spec.n_finalists
        n_tokens = None
        print(f"# guardmerge bench search: {_machine()}")
        print(f"# two BERT {layers}x{hidden} sources (random weights, built locally), dare_ties, "
              f"{texts} evaluation texts of ~{words} words; median of {trials} trials per row")
        print(f"{'dtype':<9} {'evaluated on':<22} {'setup s':>8} {'merge s':>8} {'eval s':>8} "
              f"{'trial s':>8} {'trials/h':>9} {f'{search_trials} trials':>11}")
        for dtype in dtypes:
            t = time.perf_counter()
            ctx = TrialContext(recipe, examples, dtype=dtype, screen=screen_idx)
            setup = time.perf_counter() - t
            n_tokens = sum(len(ids) for _, _, ids in ctx.sets["full"].prepared.items)
            merge_t: list[float] = []
            eval_t: dict[str, list[float]] = {stage: [] for stage in ctx.sets}
            for k in range(trials):
                params = trial_params(spec, k, recipe)
                t0 = time.perf_counter()
                ctx.load(params)
                merge_t.append(time.perf_counter() - t0)
                for stage in ctx.sets:
                    t1 = time.perf_counter()
                    ctx.evaluate(stage)
                    eval_t[stage].append(time.perf_counter() - t1)
            m_s = statistics.median(merge_t)
            full_s = m_s + statistics.median(eval_t["full"])
            row: dict[str, Any] = {"setup_s": setup, "merge_s": m_s,
                                   "eval_s": statistics.median(eval_t["full"]), "trial_s": full_s,
                                   "trials_per_hour": 3600 / full_s}
            print(f"{dtype:<9} {f'all {texts} texts':<22} {setup:>8.1f} {m_s:>8.2f} "
                  f"{row['eval_s']:>8.2f} {full_s:>8.2f} {3600 / full_s:>9.0f} "
                  f"{search_trials * full_s / 60:>7.1f} min")
            if screen:
                screen_s = m_s + statistics.median(eval_t["screen"])
                total = search_trials * screen_s + k_final * full_s
                row["screened"] = {"screen_eval_s": statistics.median(eval_t["screen"]),
                                   "screen_trial_s": screen_s, "finalists": k_final,
                                   "search_s": total,
                                   "trials_per_hour": 3600 * search_trials / total}
                label = f"{screen} first, {k_final} on all"
                print(f"{dtype:<9} {label:<22} {'':>8} {m_s:>8.2f} "
                      f"{statistics.median(eval_t['screen']):>8.2f} {screen_s:>8.2f} "
                      f"{3600 * search_trials / total:>9.0f} {total / 60:>7.1f} min")
            results[dtype] = row
            del ctx
        print(f"# {n_tokens:,} tokens per pass over all texts; '{search_trials} trials' with "
              f"screening = {search_trials} x (merge + screening eval) + {k_final} finalists x "
              f"(merge + full eval)")
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    return results


def cli(*, repeats: int = 10) -> dict[str, Any]:
    """Start-up time of the command line's fast paths, each in a fresh process (median), and
    whether the command imported torch / transformers."""
    import subprocess
    import sys

    folder = Path("policies")
    if not folder.is_dir():  # an editable install run from elsewhere: the repository's
        folder = Path(__file__).resolve().parents[2] / "policies"
    policies = sorted(str(p) for p in folder.glob("*.yaml"))
    probe = ("import sys, time; t = time.perf_counter(); from guardmerge.cli import main; "
             "import contextlib, io\n"
             "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "    rc = main(sys.argv[1:])\n"
             "print(rc, time.perf_counter() - t, 'torch' in sys.modules, "
             "'transformers' in sys.modules)")
    commands = {"guardmerge --help": ["--help"],
                f"guardmerge policy check ({len(policies)} policies)": ["policy", "check", *policies],
                "python -c pass (interpreter alone)": None}
    print(f"# guardmerge bench cli: {_machine()}")
    print(f"# each command in a fresh process, {repeats} runs, median wall time of the whole "
          "process; 'in-process' is the time from importing guardmerge.cli to main() returning")
    print(f"{'command':<44} {'process s':>9} {'in-process s':>12} {'torch?':>7} {'transformers?':>13}")
    results: dict[str, Any] = {}
    for label, argv in commands.items():
        walls, inner, flags = [], [], (False, False)
        for _ in range(repeats):
            cmd = [sys.executable, "-c", "pass"] if argv is None else \
                [sys.executable, "-c", probe, *argv]
            t = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t)
            if argv is not None:
                rc, secs, has_torch, has_tf = out.stdout.split()
                if rc != "0":
                    raise RuntimeError(f"{label} exited with {rc}")
                inner.append(float(secs))
                flags = (has_torch == "True", has_tf == "True")
        row = {"process_s": statistics.median(walls),
               "in_process_s": statistics.median(inner) if inner else None,
               "torch": flags[0], "transformers": flags[1]}
        results[label] = row
        ip = f"{row['in_process_s']:.3f}" if inner else "-"
        print(f"{label:<44} {row['process_s']:>9.3f} {ip:>12} {str(flags[0]):>7} "
              f"{str(flags[1]):>13}")
    return results
