"""Model search: finds a known-better density, resumes, is invariant to the worker count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guardmerge import BundleClassifier, ConfigError
from guardmerge.merge import (Example, MergeRecipe, ModelSpec, SearchOptions, evaluate,
                              read_results, run_search)
from guardmerge.merge.search import TrialContext, TrialParams, trial_params
from guardmerge.testing import TRIGGER, build_tokenizer, build_trigger_model, random_text, save_model_folder


def _build_case(root: Path, sigma: float = 0.1):
    """A source = the hand-wired trigger detector + dense noise; the base lacks the wiring.

    Its task vector is a few large useful entries plus many small harmful ones: TIES at a low
    density keeps the wiring and drops the noise (macro-F1 1.0), density 1 keeps it all (~0.58).
    """
    tok = build_tokenizer()
    model, _ = build_trigger_model(tok, head_layout={"jailbreak": ["benign", "jailbreak"]})
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = {k: v.clone() for k, v in sd.items()}
    for k in ("bert.encoder.layer.0.attention.self.value.weight",
              "bert.encoder.layer.0.attention.output.dense.weight", "bert.pooler.dense.weight"):
        base[k][0, 0] = 0.0
    base["classifier.weight"].zero_()
    base["classifier.bias"].zero_()
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + sigma * torch.randn(v.shape, generator=g)
             if v.is_floating_point() and "LayerNorm" not in k else v.clone() for k, v in sd.items()}
    model.load_state_dict(noisy)
    model.config.id2label = {0: "benign", 1: "jailbreak"}
    model.config.label2id = {"benign": 0, "jailbreak": 1}
    src = save_model_folder(model, tok, root / "jb-noisy")
    model.load_state_dict(base)
    b = save_model_folder(model, tok, root / "base")
    return b, src


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    base, src = _build_case(root)
    examples = []
    for i in range(40):
        trig = i % 2 == 0
        text = random_text(20 + (i * 7) % 60, seed=i, insert={(i * 3) % 20: TRIGGER} if trig else None)
        examples.append(Example(text, "jailbreak", "jailbreak" if trig else "benign"))
    data = root / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"text": e.text, "head": e.head, "label": e.label})
                              for e in examples))
    recipe = {"base": str(base), "method": "ties", "seed": 0,
              "models": [{"model": str(src), "head": "jailbreak"}]}
    return {"root": root, "recipe": recipe, "data": data, "examples": examples, "source": src}


def _recipe(n: int, **kw) -> MergeRecipe:
    return MergeRecipe(base="b", models=tuple(ModelSpec(model=f"m{i}") for i in range(n)), **kw)


def test_trial_parameters_depend_only_on_seed_and_trial():
    spec = SearchOptions(trials=5, seed=3, beta=(2, 5))
    two = _recipe(2, method="ties", lam=1.5, alpha=0.8)
    assert trial_params(spec, 2, two) == trial_params(SearchOptions(trials=50, seed=3), 2, two)
    assert trial_params(spec, 2, two) != trial_params(spec, 3, two)
    p = trial_params(spec, 2, two)
    assert (p.method, p.lam, p.alpha) == ("ties", 1.5, 0.8)  # not varied: the recipe's
    shared = trial_params(SearchOptions(seed=3, shared_density=True), 1, _recipe(3)).densities
    assert len(set(shared)) == 1
    d = trial_params(SearchOptions(seed=1, beta=(0.05, 50)), 0, _recipe(4)).densities
    assert all(0.01 <= x <= 1.0 for x in d)
    varied = SearchOptions(seed=3, beta=(2, 5), methods=("ties", "dare_ties", "regmean"),
                           lambda_range=(0.5, 2.0), alpha_range=(0.6, 1.0))
    draws = [trial_params(varied, t, two) for t in range(60)]
    assert {q.method for q in draws} == {"ties", "dare_ties", "regmean"}
    assert all(0.5 <= q.lam <= 2.0 and 0.6 <= q.alpha <= 1.0 for q in draws)
    # varying method / lambda / alpha draws after the densities and the seed: those stay
    assert [(q.densities, q.seed) for q in draws[:5]] == \
        [(q.densities, q.seed) for q in (trial_params(spec, t, two) for t in range(5))]
    with pytest.raises(ConfigError, match="methods: unknown merge method 'soup'"):
        SearchOptions(methods=("soup",))
    with pytest.raises(ConfigError, match="alpha_range: expected LO <= HI"):
        SearchOptions(alpha_range=(0.5, 1.5))


def test_search_finds_the_better_low_density(case, tmp_path):
    ctx = TrialContext(MergeRecipe.from_dict(case["recipe"]), case["examples"], dtype="float32")
    ctx.load(TrialParams(densities=[1.0], seed=0, method="ties", lam=1.0, alpha=0.9))
    full = ctx.evaluate().heads["jailbreak"].macro_f1
    assert full < 0.8  # keeping the whole noisy task vector hurts
    spec = SearchOptions(trials=6, seed=1, beta=(2.0, 8.0))
    summary = run_search(case["recipe"], [case["data"]], tmp_path / "s", spec, dtype="float32")
    best = summary["best"]
    assert best["score"] == 1.0 and best["densities"][0] < 0.5
    # the saved best bundle is exactly the evaluated candidate
    clf = BundleClassifier.from_pretrained(summary["best_bundle"])
    assert evaluate(clf, case["examples"]).heads["jailbreak"].macro_f1 == best["score"]
    report = Path(summary["report"]).read_text()
    assert "Original vs best merge" in report and "self-merge" in report
    from guardmerge.merge.report import have_matplotlib

    if have_matplotlib():
        for png in ("density_vs_f1.png", "f1_original_vs_merged.png", "confusion_jailbreak.png"):
            assert (tmp_path / "s" / png).stat().st_size > 1000
            assert f"]({png})" in report
    header, trials = read_results(summary["results"])
    assert header["type"] == "search" and [t.trial for t in trials] == list(range(6))


def test_resume_after_interruption(case, tmp_path):
    spec = SearchOptions(trials=4, seed=2)
    out = tmp_path / "s"
    full = run_search(case["recipe"], [case["data"]], tmp_path / "full", spec, dtype="float32",
                      save_best=False, compare_sources=False, report=False)
    run_search(case["recipe"], [case["data"]], out, SearchOptions(trials=2, seed=9), dtype="float32",
               save_best=False, compare_sources=False, report=False)
    with pytest.raises(ConfigError, match="different search"):  # another seed: refused
        run_search(case["recipe"], [case["data"]], out, spec, dtype="float32", resume=True,
                   save_best=False, compare_sources=False, report=False)
    # simulate an interruption of the 4-trial search after 2 trials and a half-written line
    lines = (tmp_path / "full" / "trials.jsonl").read_text().splitlines()
    (out / "trials.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    with pytest.raises(ConfigError, match="already exists"):
        run_search(case["recipe"], [case["data"]], out, spec, dtype="float32",
                   save_best=False, compare_sources=False, report=False)
    resumed = run_search(case["recipe"], [case["data"]], out, spec, dtype="float32", resume=True,
                         save_best=False, compare_sources=False, report=False)
    assert resumed["best"] == full["best"]
    _, a = read_results(out / "trials.jsonl")
    _, b = read_results(tmp_path / "full" / "trials.jsonl")
    assert [(t.trial, t.densities, t.score) for t in a] == [(t.trial, t.densities, t.score) for t in b]


def test_a_finished_search_is_extended_without_redoing_its_trials(case, tmp_path, monkeypatch):
    import guardmerge.merge.search as search

    kw = dict(dtype="float32", save_best=False, compare_sources=False, report=False)
    full = run_search(case["recipe"], [case["data"]], tmp_path / "full", SearchOptions(trials=5, seed=4), **kw)
    out = tmp_path / "grow"
    run_search(case["recipe"], [case["data"]], out, SearchOptions(trials=3, seed=4), **kw)
    ran = []
    real = search.run_trial
    monkeypatch.setattr(search, "run_trial", lambda o, t, *a, **k: ran.append(t) or real(o, t, *a, **k))
    grown = run_search(case["recipe"], [case["data"]], out, SearchOptions(trials=5, seed=4),
                       resume=True, **kw)
    assert ran == [3, 4] and grown["best"] == full["best"]
    _, a = read_results(out / "trials.jsonl")
    _, b = read_results(tmp_path / "full" / "trials.jsonl")
    assert [(t.trial, t.densities, t.score) for t in a] == [(t.trial, t.densities, t.score) for t in b]


def test_cli_search(case, tmp_path, capsys):
    import yaml

    from guardmerge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**case["recipe"], "method": "dare_ties"}))
    assert main(["search", str(recipe), "--eval", str(case["data"]), "--trials", "3", "--seed", "0",
                 "--dtype", "float32", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "report:" in out
    assert (tmp_path / "out" / "best-bundle" / "guardmerge.json").exists()


def test_report_without_matplotlib_still_has_the_numbers(case, tmp_path, monkeypatch):
    import guardmerge.merge.report as report

    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    summary = run_search(case["recipe"], [case["data"]], tmp_path / "s", SearchOptions(trials=2, seed=0),
                         dtype="float32", save_best=False)
    text = Path(summary["report"]).read_text()
    assert "Plots skipped" in text and "| trial | score |" in text and "original F1" in text
    assert not list((tmp_path / "s").glob("*.png"))


def test_screen_subset_is_stratified_exact_and_seeded():
    from guardmerge.merge.search import screen_subset

    examples = ([Example(f"j{i}", "jb", "jailbreak") for i in range(30)]
                + [Example(f"b{i}", "jb", "benign") for i in range(60)]
                + [Example(f"h{i}", "hate", "hate") for i in range(10)])
    idx = screen_subset(examples, 20, seed=4)
    assert len(idx) == 20 == len(set(idx)) and idx == sorted(idx)
    counts = {}
    for i in idx:
        key = (examples[i].head, examples[i].label)
        counts[key] = counts.get(key, 0) + 1
    assert counts == {("jb", "jailbreak"): 6, ("jb", "benign"): 12, ("hate", "hate"): 2}
    assert screen_subset(examples, 20, seed=4) == idx != screen_subset(examples, 20, seed=5)
    assert len(screen_subset(examples, 2, seed=0)) == 2  # fewer slots than groups: still exact
    with pytest.raises(ConfigError, match="smaller than the 100"):
        screen_subset(examples, 100, seed=0)
    with pytest.raises(ConfigError, match="finalists .3. needs screen > 0"):
        SearchOptions(trials=8, finalists=3)


def test_screened_search_sends_the_best_screening_scores_to_all_examples(case, tmp_path):
    spec = SearchOptions(trials=8, seed=1, beta=(2.0, 8.0), screen=12, finalists=3)
    summary = run_search(case["recipe"], [case["data"]], tmp_path / "s", spec, dtype="float32")
    _, rows = read_results(summary["results"])
    screen = [r for r in rows if r.stage == "screen"]
    full = [r for r in rows if r.stage == "full"]
    assert [r.trial for r in screen] == list(range(8))
    expected = sorted(r.trial for r in sorted(screen, key=lambda r: (-r.score, r.trial))[:3])
    assert [r.trial for r in full] == expected == summary["screen"]["finalists"]
    assert all(r.report["heads"]["jailbreak"]["n"] == 12 for r in screen)
    assert all(r.report["heads"]["jailbreak"]["n"] == 40 for r in full)
    # a finalist's score on all examples is what an unscreened search gives that trial
    plain = run_search(case["recipe"], [case["data"]], tmp_path / "plain",
                       SearchOptions(trials=8, seed=1, beta=(2.0, 8.0)), dtype="float32",
                       save_best=False, compare_sources=False, report=False)
    _, plain_rows = read_results(plain["results"])
    by_trial = {r.trial: r.score for r in plain_rows}
    assert all(r.score == by_trial[r.trial] for r in full)
    best = max(full, key=lambda r: (r.score, -r.trial))
    assert summary["best"]["trial"] == best.trial and summary["best"]["score"] == best.score
    clf = BundleClassifier.from_pretrained(summary["best_bundle"])
    assert evaluate(clf, case["examples"]).heads["jailbreak"].macro_f1 == best.score
    assert "screening: every trial scored on 12 examples" in Path(summary["report"]).read_text()


def test_screened_search_resumes_and_ignores_the_worker_count(case, tmp_path):
    spec = SearchOptions(trials=6, seed=2, screen=10, finalists=2)
    kw = dict(dtype="float32", save_best=False, compare_sources=False, report=False)
    ref = run_search(case["recipe"], [case["data"]], tmp_path / "ref", spec, **kw)
    lines = (tmp_path / "ref" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 6 + 2
    for cut in (4, 8):  # interrupted while screening, then while evaluating the finalists
        out = tmp_path / f"cut{cut}"
        out.mkdir()
        (out / "trials.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:30])
        resumed = run_search(case["recipe"], [case["data"]], out, spec, resume=True, **kw)
        assert resumed["best"] == ref["best"]
        _, a = read_results(out / "trials.jsonl")
        _, b = read_results(tmp_path / "ref" / "trials.jsonl")
        assert [(r.trial, r.stage, r.score) for r in a] == [(r.trial, r.stage, r.score) for r in b]
    two = run_search(case["recipe"], [case["data"]], tmp_path / "w2", spec, workers=2, **kw)
    assert two["best"] == ref["best"] and two["screen"] == ref["screen"]
    _, a = read_results(tmp_path / "w2" / "trials.jsonl")
    _, b = read_results(tmp_path / "ref" / "trials.jsonl")
    assert [(r.trial, r.stage, r.seed, r.densities, r.heads) for r in a] == \
        [(r.trial, r.stage, r.seed, r.densities, r.heads) for r in b]


def test_screened_search_progress_shows_the_best_score_so_far(case, tmp_path, monkeypatch):
    import io
    import re
    import sys

    class Terminal(io.StringIO):  # progress bars draw only on a terminal
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    spec = SearchOptions(trials=8, seed=1, beta=(2.0, 8.0), screen=12, finalists=3)
    summary = run_search(case["recipe"], [case["data"]], tmp_path / "s", spec, dtype="float32",
                         save_best=False, compare_sources=False, report=False, progress=True)
    _, rows = read_results(summary["results"])
    by_done = {}
    for frame in re.split(r"[\r\n]", err.getvalue()):  # "search: 45%|###| 5/11 [00:01, <note>]"
        m = re.search(r"search: .*\| (\d+)/11 \[[^,\]]*, (.*)\]", frame)
        if m:
            by_done[int(m.group(1))] = m.group(2)
    assert set(by_done) == set(range(1, 12))
    assert by_done[11].startswith(f"best {summary['best']['score']:.4f} (trial "
                                  f"{summary['best']['trial']})")
    for done in range(1, 9):  # still screening: the best screening score among the first `done`
        top = max(rows[:done], key=lambda r: (r.score, -r.trial))
        assert by_done[done].startswith(f"screening, best {top.score:.4f} (trial {top.trial})")
        assert re.search(r", eta (\d+:)?\d\d:\d\d$", by_done[done]), by_done[done]


def test_progress_bars_are_silent_when_stderr_is_not_a_terminal(case, tmp_path, capsys):
    run_search(case["recipe"], [case["data"]], tmp_path / "s", SearchOptions(trials=2, seed=0),
               dtype="float32", save_best=False, compare_sources=False, report=False)
    assert capsys.readouterr().err == ""


def test_a_screened_search_extended_ranks_like_a_fresh_search(case, tmp_path):
    kw = dict(seed=3, screen=10, beta=(2.0, 8.0), dtype="float32", save_best=False,
              compare_sources=False, report=False, progress=False)
    fresh = run_search(case["recipe"], [case["data"]], tmp_path / "fresh", SearchOptions(trials=40, **kw))
    run_search(case["recipe"], [case["data"]], tmp_path / "grow", SearchOptions(trials=20, **kw))
    grown = run_search(case["recipe"], [case["data"]], tmp_path / "grow",
                       SearchOptions(trials=40, resume=True, **kw))
    assert grown["screen"]["finalists"] == fresh["screen"]["finalists"]
    assert grown["best"] == fresh["best"]
    _, rows = read_results(tmp_path / "grow" / "trials.jsonl")
    assert len([r for r in rows if r.stage == "screen"]) == 40  # nothing screened twice
