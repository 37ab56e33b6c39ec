"""``guardmerge bench serve``: the proxy measured in one run against the same upstream direct.

An in-process fake upstream (Starlette on uvicorn, in a thread) answers every chat call after
a fixed latency, echoing the prompt (streamed: in 8 chunks). A load generator (httpx, one
event loop) sends unique prompts at each concurrency, stream and non-stream, to the upstream
directly, through a bare pass-through on the proxy's own stack with no guard (Starlette on
uvicorn, the proxy's pooled ``Upstream`` client, events parsed and re-serialised as the proxy
does: what one more HTTP hop costs here, whatever is guarded), to the proxy with batching on
and to the proxy with batching off (the same loaded model). Reported per cell: p50 / p99
latency, throughput, and for the proxy the latency it adds over direct (p50 and p99
differences), the guard's model time per request and the mean batch size. The summary splits
the concurrency-1 latency the proxy adds into the model's time, the bare hop's and the rest
(the guard's own work outside the model: reading the messages, normalising, tokenising, the
hand-off to the model thread and back, the policy). Every answer must carry its own prompt's
id and the upstream must see every id exactly once: a request lost or answered twice is
reported.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run"]

POLICY = """
name: bench
input:
  roles: [user]
  rules: [{id: jb, head: jailbreak, labels: [jailbreak], block: 1.0}]
output:
  rules: [{id: jb-out, head: jailbreak, labels: [jailbreak], block: 1.0}]
"""


def _upstream_app(latency: float, seen: collections.Counter, gap: float = 0.0) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Any:
        body = await request.json()
        text = body["messages"][-1]["content"]
        seen[text.split(" ", 1)[0]] += 1
        await asyncio.sleep(latency)
        reply = f"You said: {text}"
        base = {"id": "c", "created": 0, "model": "m"}
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": reply}}]})
        words = reply.split(" ")
        step = max(1, len(words) // 8)
        pieces = [" ".join(words[i:i + step]) + " " for i in range(0, len(words), step)]
        pieces[-1] = pieces[-1].rstrip()

        async def events() -> Any:
            chunk = {**base, "object": "chat.completion.chunk"}
            for i, piece in enumerate(pieces):
                if gap and i:
                    await asyncio.sleep(gap)  # a model generating the next tokens
                yield ("data: " + json.dumps({**chunk, "choices": [
                    {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}) +
                       "\n\n").encode()
            yield ("data: " + json.dumps({**chunk, "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n").encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def _stack() -> str:
    """What uvicorn runs on here: its "auto" loop and HTTP parser take uvloop and httptools
    where they are installed (the [server] extra installs neither: they did not help here)."""
    import importlib.util

    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__}, loop {loop}, http {http}"


def _passthrough_app(upstream_url: str) -> Any:
    """The bare hop: the proxy's stack (Starlette, uvicorn, ``Upstream``) with no guard."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from ..serve.upstream import EventStream, Upstream

    holder: dict[str, Upstream] = {}

    async def chat(request: Request) -> Any:
        upstream = holder.get("u")
        if upstream is None:  # created on the server's own event loop
            upstream = holder["u"] = Upstream(upstream_url, timeout=120, connect_timeout=5,
                                              max_connections=256)
        body = json.loads(await request.body())
        headers = {"content-type": "application/json"}
        if not body.get("stream"):
            reply = await upstream.send("POST", "/chat/completions", "chat", headers=headers,
                                        body=body)
            return Response(reply.body, status_code=reply.status,
                            media_type="application/json")
        opened = await upstream.stream("/chat/completions", "chat", headers=headers,
                                       body=body, needs_done=True)
        assert isinstance(opened, EventStream)

        async def events() -> Any:
            try:
                async for item in opened:
                    yield ("data: " + json.dumps(item) + "\n\n").encode()
                yield b"data: [DONE]\n\n"
            finally:
                await opened.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def _load(url: str, prompts: Sequence[str], concurrency: int,
                stream: bool) -> tuple[list[float], float, dict[str, Any]]:
    """(latencies, wall seconds, answers per id) for ``prompts`` sent ``concurrency`` at once."""
    import httpx

    answers: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    latencies: list[float] = []
    queue = list(enumerate(prompts))
    # One client with one kept-alive connection per simulated caller, as independent apps are:
    # one shared pool of ``concurrency`` connections costs the load generator O(connections)
    # socket polls per request (httpcore's pool upkeep), which at concurrency 64 took more CPU
    # than the proxy's own upstream client (profiled) and flattened every mode's throughput.
    # The clients are made before the clock starts and share one TLS context: each would
    # otherwise build its own from the CA bundle (~17 ms apiece here, on the event loop).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = httpx.create_ssl_context(verify=True, trust_env=False)

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            _, prompt = queue.pop(0)
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}],
                    "stream": stream}
            t = time.perf_counter()
            text, status = "", 0
            try:
                if stream:
                    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                choices = json.loads(line[6:]).get("choices") or [{}]
                                text += choices[0].get("delta", {}).get("content") or ""
                    status = r.status_code
                else:
                    r = await http.post("/v1/chat/completions", json=body)
                    status = r.status_code
                    text = r.json()["choices"][0]["message"]["content"] \
                        if status == 200 else ""
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - t)
            if status == 200 and text == f"You said: {prompt}":
                answers[prompt.split(" ", 1)[0]] += 1
            elif status:
                errors[f"HTTP {status}" + (" (wrong text)" if status == 200 else "")] += 1

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, timeout=120, limits=limits, trust_env=False, verify=tls))
            for _ in range(concurrency)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for http in clients))
        wall = time.perf_counter() - start
    answers["__errors__"] = dict(errors)  # type: ignore[assignment]
    return latencies, wall, dict(answers)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(*, bundle: str | None = None, layers: int = 12, hidden: int = 768,
        dtype: str = "float32", concurrency: Sequence[int] = (1, 8, 64), requests: int = 0,
        latency_ms: float = 50.0, words: int = 24, gap_ms: float = 0.0) -> dict[str, Any]:
    from ..classifier import BundleClassifier
    from ..guard import Guard
    from ..policy import Policy
    from ..serve import BackgroundServer, ServeOptions, create_app
    from ..testing import bert_base_vocab, random_text
    from .bench import _base_sized_bundle, _machine

    tmp = Path(tempfile.mkdtemp(prefix="guardmerge-bench-serve-"))
    results: dict[str, Any] = {"machine": _machine(), "server": _stack(), "cells": []}
    try:
        if bundle == "trivial":  # a model-free classifier: what the proxy itself costs
            from ..classifier import FunctionClassifier

            clf: Any = FunctionClassifier({"jailbreak": ["benign", "jailbreak"]},
                                          lambda t: {"jailbreak": {"jailbreak": 0.01}})
            described = "a trivial FunctionClassifier (no model)"
        elif bundle is None:
            layout = {"jailbreak": ["benign", "jailbreak"],
                      "toxicity": ["normal", "offensive", "hateful"]}
            path, _ = _base_sized_bundle(tmp / "bundle", layers=layers, hidden=hidden,
                                         heads=max(1, hidden // 64), intermediate=hidden * 4,
                                         head_layout=layout)
            described = f"BERT {layers} layers x {hidden} (random weights, 2 heads)"
        else:
            path, described = Path(bundle), str(bundle)
        if bundle != "trivial":
            clf = BundleClassifier.from_pretrained(path, dtype=dtype, batch_size=64)
        policy = Policy.from_yaml(POLICY)
        seen: collections.Counter = collections.Counter()
        upstream = BackgroundServer(_upstream_app(latency_ms / 1000, seen, gap_ms / 1000),
                                    wait_ready=False).start()
        proxies = {}
        bare = BackgroundServer(_passthrough_app(upstream.url + "/v1"), wait_ready=False).start()
        for label, batching in (("on", True), ("off", False)):
            opts = ServeOptions(upstream=upstream.url + "/v1", batching=batching,
                                max_batch_windows=64, max_batch_tokens=64 * 128,
                                max_queue=1024, check_timeout=600, cache_size=0)
            guard = Guard(clf, policy, cache_size=0)
            app = create_app(opts, guard=guard, environ={})
            proxies[label] = (BackgroundServer(app).start(), app.state.guardmerge)
        # mode -> (its URL, the proxy's state for its batch statistics, or None)
        targets = {"direct": (upstream.url, None), "pass-through": (bare.url, None),
                   **{f"batching {label}": (server.url, state)
                      for label, (server, state) in proxies.items()}}
        vocab = bert_base_vocab()[:5000]
        print(f"# guardmerge bench serve: {results['machine']}")
        gap = f", then streamed chunks {gap_ms:g} ms apart" if gap_ms else ""
        print(f"# guard: {described}, dtype {dtype}; upstream: in-process, fixed latency "
              f"{latency_ms:g} ms{gap}; prompts of {words} words, unique; each request = "
              "prompt check + upstream + response check")
        print(f"# server: {results['server']}")
        print(f"{'mode':<12} {'conc':>4} {'stream':>6} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'req/s':>7} {'+p50 ms':>8} {'+p99 ms':>8} {'model ms':>8} {'checks/b':>8} "
              f"{'win/b':>6} {'ok':>4}")
        counter = 0
        for c in concurrency:
            for stream in (False, True):
                n = requests or max(24, 4 * c)
                direct = None
                for mode in targets:
                    prompts = []
                    for _ in range(n):
                        counter += 1
                        prompts.append(f"r{counter} " + random_text(words, seed=counter,
                                                                    words=vocab))
                    url, state = targets[mode]
                    # a short warm-up at this concurrency (not measured, not counted)
                    warm = [f"w{counter}-{i} hello" for i in range(min(c, 8))]
                    asyncio.run(_load(url, warm, min(c, 8), stream))
                    before = (state.batcher.stats.batches, state.batcher.stats.checks,
                              state.batcher.stats.windows,
                              state.metrics.value("guardmerge_model_seconds_sum")) \
                        if state else None
                    latencies, wall, answers = asyncio.run(_load(url, prompts, c, stream))
                    failures = answers.pop("__errors__", {})
                    ids = [p.split(" ", 1)[0] for p in prompts]
                    lost = sum(1 for i in ids if answers.get(i, 0) == 0)
                    twice = sum(1 for i in ids if answers.get(i, 0) > 1 or seen[i] > 1)
                    row: dict[str, Any] = {
                        "mode": mode, "concurrency": c, "stream": stream, "requests": n,
                        "p50_ms": 1000 * _pct(latencies, 0.5),
                        "p99_ms": 1000 * _pct(latencies, 0.99), "req_per_s": n / wall,
                        "lost": lost, "answered_twice": twice, "failures": failures}
                    if state is not None:
                        stats = state.batcher.stats
                        batches = stats.batches - before[0]
                        row["checks_per_batch"] = (stats.checks - before[1]) / max(1, batches)
                        row["windows_per_batch"] = (stats.windows - before[2]) / max(1, batches)
                        row["model_ms_per_request"] = 1000 * (state.metrics.value(
                            "guardmerge_model_seconds_sum") - before[3]) / n
                    if mode == "direct":
                        direct = row
                    else:
                        row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
                        row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
                    results["cells"].append(row)
                    added = f"{row['added_p50_ms']:>8.1f} {row['added_p99_ms']:>8.1f}" \
                        if direct is not row else f"{'':>8} {'':>8}"
                    guard = (f"{row['model_ms_per_request']:>8.1f} "
                             f"{row['checks_per_batch']:>8.2f} {row['windows_per_batch']:>6.2f}"
                             ) if state else f"{'':>8} {'':>8} {'':>6}"
                    extra = f"{added} {guard}"
                    ok = "yes" if not lost and not twice else f"{lost}L/{twice}T"
                    print(f"{mode:<12} {c:>4} {'yes' if stream else 'no':>6} {n:>4} "
                          f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                          f"{row['req_per_s']:>7.1f} {extra} {ok:>4}"
                          + (f"  {failures}" if failures else ""), flush=True)
        _summary(results, concurrency)
        for server, _ in proxies.values():
            server.stop()
        bare.stop()
        upstream.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _summary(results: dict[str, Any], concurrency: Sequence[int]) -> None:
    cells = results["cells"]

    def cell(mode: str, c: int, stream: bool) -> dict[str, Any]:
        return next(r for r in cells if r["mode"] == mode and r["concurrency"] == c
                    and r["stream"] == stream)

    print("# targets")
    for stream in (False, True):
        kind = "stream" if stream else "non-stream"
        if 1 in concurrency:
            on = cell("batching on", 1, stream)
            hop = cell("pass-through", 1, stream)["added_p50_ms"]
            over = on["added_p50_ms"] - on["model_ms_per_request"]
            results[f"c1_{kind}"] = {"added": on["added_p50_ms"], "model":
                                     on["model_ms_per_request"], "hop": hop,
                                     "rest": over - hop}
            print(f"concurrency 1, {kind}: proxy adds {on['added_p50_ms']:.1f} ms at p50 = model "
                  f"{on['model_ms_per_request']:.1f} ms + {over:.1f} ms (target: + <= 2 ms): "
                  f"{'met' if over <= 2 else 'MISSED'}; of the {over:.1f} ms, the bare hop "
                  f"(pass-through, no guard) is {hop:.1f} ms and the guard's work outside the "
                  f"model {over - hop:.1f} ms")
        top = max(concurrency)
        ratio = cell("batching on", top, stream)["req_per_s"] / \
            cell("batching off", top, stream)["req_per_s"]
        results[f"ratio_{kind}"] = ratio
        print(f"concurrency {top}, {kind}: batching on / off throughput {ratio:.2f}x (target: "
              f">= 1.5x): {'met' if ratio >= 1.5 else 'MISSED'}")
    bad = sum(r["lost"] + r["answered_twice"] for r in cells)
    print(f"requests lost or answered twice: {bad}")
