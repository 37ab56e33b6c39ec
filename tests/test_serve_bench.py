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
