"""``guardmerge bench serve`` runs end to end (a smoke run: its figures are not asserted)."""

from guardmerge.tools import serve_bench


def test_bench_serve_runs_every_mode_and_loses_nothing(capsys):
    results = serve_bench.run(bundle="trivial", concurrency=(1,), requests=4, latency_ms=0)
    cells = results["cells"]
    assert [(c["mode"], c["stream"]) for c in cells] == [
        (mode, stream) for stream in (False, True)
        for mode in ("direct", "pass-through", "batching on", "batching off")]
    assert all(c["lost"] == 0 and c["answered_twice"] == 0 and not c["failures"] for c in cells)
    assert all("added_p50_ms" in c for c in cells if c["mode"] != "direct")
    assert all("model_ms_per_request" in c for c in cells if c["mode"].startswith("batching"))
    for kind in ("non-stream", "stream"):
        split = results[f"c1_{kind}"]
        assert abs(split["added"] - split["model"] - split["hop"] - split["rest"]) < 1e-9
    out = capsys.readouterr().out
    assert "pass-through" in out and "the bare hop (pass-through, no guard)" in out


def test_bench_serve_spaces_streamed_chunks_when_asked(capsys):
    results = serve_bench.run(bundle="trivial", concurrency=(1,), requests=2, latency_ms=0,
                              gap_ms=20)
    streamed = [c for c in results["cells"] if c["stream"]]
    # the fake upstream streams 8 pieces of its reply (then the finish chunk): 7 gaps of 20 ms
    assert streamed and all(c["p50_ms"] >= 7 * 20 for c in streamed)
    assert all(c["p50_ms"] < 100 for c in results["cells"] if not c["stream"])
    assert all(c["lost"] == 0 and c["answered_twice"] == 0 for c in results["cells"])
    assert "streamed chunks 20 ms apart" in capsys.readouterr().out
