"""Merge quality: calibration texts, RegMean, head re-fit, distillation, the mergeability report
and the collapse warning, on tiny models built here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guardmerge import ConfigError, DataError, RecipeError
from guardmerge.cli import main
from guardmerge.merge import (EvalReport, HeadReport, MergeRecipe, collapse_warnings, distill,
                              merge, mergeability, metrics)
from guardmerge.labels import MULTI_LABEL, Head
from guardmerge.merge.activations import load_model, logits
from guardmerge.merge.calibration import load_calibration
from guardmerge.merge.regmean import regmean
from guardmerge.merge.statistics import gram_statistics
from guardmerge.testing import (build_base_folder, build_classifier_folder, build_tokenizer,
                                random_text)


# -- RegMean's closed form ------------------------------------------------------------------


def _layer(seed: int, n: int, d_in: int = 6, d_out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ \
        torch.randn(d_in, d_in, generator=g, dtype=torch.float64)  # correlated inputs
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), x


def test_regmean_equals_a_direct_least_squares_solve():
    (w1, x1), (w2, x2) = _layer(1, 40), _layer(2, 25)
    c = [1.0, 2.5]
    # minimise sum_i c_i / n_i ||X_i W^T - X_i W_i^T||^2 by stacking the scaled rows
    x = torch.cat([x1 * (c[0] / len(x1)) ** 0.5, x2 * (c[1] / len(x2)) ** 0.5])
    y = torch.cat([x1 @ w1.T * (c[0] / len(x1)) ** 0.5, x2 @ w2.T * (c[1] / len(x2)) ** 0.5])
    direct = torch.linalg.lstsq(x, y).solution.T
    grams = [x1.T @ x1 / len(x1), x2.T @ x2 / len(x2)]  # what the statistics cache holds
    got = regmean([w1.float(), w2.float()], grams, alpha=1.0, scales=c)
    assert torch.allclose(got.double(), direct, atol=1e-5)


def test_regmean_of_one_source_is_that_source():
    w, x = _layer(3, 30)
    for alpha in (1.0, 0.9, 0.2):
        assert torch.allclose(regmean([w.float()], [x.T @ x], alpha=alpha), w.float(), atol=1e-5)


def test_regmean_alpha_towards_zero_is_a_per_input_weighted_mean():
    (w1, x1), (w2, x2) = _layer(4, 30), _layer(5, 30)
    g1, g2 = x1.T @ x1, x2.T @ x2
    d1, d2 = torch.diagonal(g1), torch.diagonal(g2)
    column_mean = (w1 * d1 + w2 * d2) / (d1 + d2)  # column j weighted by each source's g_jj
    tiny = regmean([w1.float(), w2.float()], [g1, g2], alpha=1e-9)
    assert torch.allclose(tiny.double(), column_mean, atol=1e-5)
    full = regmean([w1.float(), w2.float()], [g1, g2], alpha=1.0)
    assert not torch.allclose(full.double(), column_mean, atol=1e-3)


def test_regmean_keeps_the_mean_where_no_input_was_ever_seen():
    w1, w2 = torch.randn(2, 3), torch.randn(2, 3)
    g = torch.eye(3, dtype=torch.float64)
    g[2, 2] = 0.0  # input 2 was always zero
    got = regmean([w1, w2], [g, g], alpha=1.0)
    assert torch.allclose(got[:, 2], (w1[:, 2] + w2[:, 2]) / 2, atol=1e-6)
    assert torch.isfinite(got).all()


# -- a tiny family whose plain merge breaks the heads --------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two fine-tunes far enough apart that owner heads no longer fit the merged
    encoder (noise 0.3 on every encoder weight), plus unlabelled texts."""
    d = tmp_path_factory.mktemp("family")
    tok = build_tokenizer()
    base, state = build_base_folder(d / "base", tokenizer=tok, seed=0)
    a = build_classifier_folder(d / "a", ["x", "y"], tokenizer=tok, seed=1, base_state=state,
                                noise=0.3)
    b = build_classifier_folder(d / "b", ["p", "q", "r"], tokenizer=tok, seed=2,
                                base_state=state, noise=0.3)
    cal = d / "calibration.jsonl"
    cal.write_text("\n".join(json.dumps({"text": random_text(20, seed=i),
                                         "head": "a" if i % 3 == 0 else None})
                             for i in range(300)) + "\n")
    held = [random_text(20, seed=10_000 + i) for i in range(150)]
    return {"dir": d, "base": base, "a": a, "b": b, "calibration": cal, "held": held}


def _recipe(f, **kw) -> dict:
    return {"base": str(f["base"]), "method": "task_arithmetic",
            "models": [{"model": str(f["a"]), "head": "a"}, {"model": str(f["b"]), "head": "b"}],
            "calibration": {"texts": str(f["calibration"]), "cache": str(f["dir"] / "cache"),
                            "per_source": 120},
            "refit": {"texts": 300}, **kw}


def _agreement(f, bundle: Path) -> dict[str, float]:
    """Per head: how often the bundle's head picks the label its source picks (held-out)."""
    model, tok = load_model(bundle)
    z = logits(model, tok, f["held"])
    out = {}
    for head, src, part in (("a", f["a"], slice(0, 2)), ("b", f["b"], slice(2, 5))):
        sm, st = load_model(src)
        out[head] = float((z[:, part].argmax(-1) == logits(sm, st, f["held"]).argmax(-1))
                          .float().mean())
    return out


def test_batches_group_similar_lengths_and_every_row_goes_back_to_its_text(family):
    from guardmerge.merge.activations import batches, head_features

    model, tok = load_model(family["a"])
    texts = [random_text(n, seed=n) for n in (3, 40, 7, 25, 3, 60, 12, 33, 5, 18)]
    lengths = [len(tok(t, truncation=True, max_length=64)["input_ids"]) for t in texts]
    seen, widths = [], []
    for idx, enc in batches(tok, texts, max_length=64, batch_size=3):
        seen += idx
        widths.append(enc["input_ids"].shape[1])
        assert enc["input_ids"].shape[1] == max(lengths[i] for i in idx)
    assert sorted(seen) == list(range(len(texts)))
    assert widths == sorted(widths, reverse=True)  # longest first: little padding
    assert sum(w * 3 for w in widths) < sum(max(lengths[i:i + 3]) * 3 for i in range(0, 10, 3))
    # each text's row is the one it gets scored alone, at its own index
    alone = torch.cat([logits(model, tok, [t], max_length=64) for t in texts])
    assert torch.allclose(logits(model, tok, texts, max_length=64, batch_size=3), alone,
                          atol=1e-5)
    feats = head_features(model, tok, texts, max_length=64, batch_size=3)[0]
    one = torch.cat([head_features(model, tok, [t], max_length=64)[0] for t in texts])
    assert torch.allclose(feats, one, atol=1e-5)


def test_refit_recovers_heads_that_a_plain_merge_broke(family, tmp_path):
    owner = merge(_recipe(family, head_mode="owner"), tmp_path / "owner", progress=False)
    refit = merge(_recipe(family, head_mode="refit"), tmp_path / "refit", progress=False)
    broken, fixed = _agreement(family, owner), _agreement(family, refit)
    assert max(broken.values()) < 0.5          # the owner rows no longer fit
    assert min(fixed.values()) > 0.8           # re-fitted on unlabelled texts only
    manifest = json.loads((refit / "guardmerge.json").read_text())
    cal = load_calibration(family["calibration"], heads=["a", "b"])
    assert manifest["calibration"]["sha256"] == cal.sha256 and manifest["calibration"]["texts"] == 300
    assert manifest["refit"]["texts"] == 300 and manifest["recipe"]["head_mode"] == "refit"
    for h in ("a", "b"):
        assert manifest["refit"]["heads"][h]["kl_after"] < manifest["refit"]["heads"][h]["kl_before"]
    # only the output layer changed: the encoder is the plain merge's, byte for byte
    t_owner, t_refit = load_file(str(owner / "model.safetensors")), load_file(str(refit / "model.safetensors"))
    changed = sorted(n for n in t_owner if not torch.equal(t_owner[n], t_refit[n]))
    assert changed == ["classifier.bias", "classifier.weight"]


def _sha(p: Path) -> str:
    return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()


def test_regmean_and_refit_merges_are_deterministic_and_use_the_statistics_cache(family, tmp_path,
                                                                                monkeypatch):
    r = _recipe(family, method="regmean", head_mode="refit", parameters={"alpha": 0.8})
    first = merge(r, tmp_path / "one", progress=False)
    def no_model(*a, **k):
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr("guardmerge.merge.activations.load_model", no_model)
    second = merge(r, tmp_path / "two", progress=False)  # statistics and teachers: cached
    assert _sha(first) == _sha(second)
    manifest = json.loads((first / "guardmerge.json").read_text())
    assert manifest["regmean"] == {"alpha": 0.8, "texts_per_source": [120, 120]}


def test_statistics_cache_is_keyed_by_source_and_texts(family, tmp_path, monkeypatch):
    texts = [random_text(10, seed=i) for i in range(20)]
    modules = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    cache = tmp_path / "cache"
    first = gram_statistics(family["a"], "sha-a", texts, modules, max_length=32, cache=cache)
    calls = []
    import guardmerge.merge.activations as activations

    real = activations.linear_grams
    monkeypatch.setattr(activations, "linear_grams", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = gram_statistics(family["a"], "sha-a", texts, modules, max_length=32, cache=cache)
    assert calls == [] and again.path == first.path  # a hit
    for name in modules:
        assert torch.equal(again.gram(name), first.gram(name))
    other = gram_statistics(family["a"], "sha-a", texts[:10], modules, max_length=32, cache=cache)
    changed = gram_statistics(family["a"], "sha-CHANGED", texts, modules, max_length=32, cache=cache)
    assert calls == [1, 1] and len({first.path, other.path, changed.path}) == 3
    # the Gram matrix is X^T X / rows of the layer's inputs, non-pad tokens only
    g = first.gram("bert.encoder.layer.0.attention.self.query")
    assert g.dtype == torch.float64 and torch.allclose(g, g.T)
    first.path.write_bytes(b"truncated")  # a damaged cache file is recomputed, not trusted
    gram_statistics(family["a"], "sha-a", texts, modules, max_length=32, cache=cache)
    assert calls == [1, 1, 1]


def test_recipes_need_calibration_for_regmean_and_refit_and_check_its_keys(tmp_path):
    base = {"base": "b", "models": [{"model": "m"}]}
    with pytest.raises(RecipeError) as err:
        MergeRecipe.from_dict({**base, "method": "regmean", "head_mode": "refit"})
    assert "method: regmean needs calibration texts" in str(err.value)
    assert "head_mode: refit needs calibration texts" in str(err.value)
    with pytest.raises(RecipeError) as err:
        MergeRecipe.from_dict({**base, "method": "regmean", "parameters": {"alpha": 0},
                               "calibration": {"texts": "c.jsonl", "limit": 0, "bogus": 1},
                               "refit": {"pull": -1}})
    for problem in ("parameters.alpha: expected a number in (0, 1]", "calibration.limit",
                    "calibration.bogus: unknown key", "refit.pull"):
        assert problem in str(err.value)


@pytest.mark.parametrize("extra", [
    {"method": "ties", "head_mode": "owner"},
    {"method": "regmean", "head_mode": "refit", "calibration": {"texts": "c.jsonl", "limit": 9},
     "refit": {"texts": 50, "pull": 0.5}},
])
def test_a_recipe_survives_its_own_to_dict(extra):
    # the search sends recipe.to_dict() to its worker processes: it must load back unchanged
    recipe = MergeRecipe.from_dict({"base": "b", "models": [{"model": "m"}], **extra})
    again = MergeRecipe.from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert ("calibration" in recipe.to_dict()) == ("calibration" in extra)
    with pytest.raises(RecipeError, match="calibration"):
        MergeRecipe.from_dict({"base": "b", "models": [{"model": "m"}], "calibration": None})


def test_calibration_files_jsonl_csv_and_plain_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "alpha", "head": "x", "label": "ignored"}\n'
                                      '{"text": "beta"}\n\n{"text": "alpha", "head": "y"}\n')
    (tmp_path / "b.csv").write_text("text,head\ngamma,y\ndelta,\n")
    (tmp_path / "c.txt").write_text("epsilon\n\nzeta\n")
    cal = load_calibration([tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.txt"],
                           heads=["x", "y"])
    rows = dict(zip(cal.texts, cal.heads))
    assert rows == {"alpha": None, "beta": None, "gamma": "y", "delta": None, "epsilon": None,
                    "zeta": None}  # "alpha" named by two heads: every source sees it
    shared = [t for t in cal.texts if t != "gamma"]
    assert cal.for_head(["y"]) == ["gamma"] + shared  # its own texts first, then unassigned
    assert cal.for_head(["y"], limit=2) == ["gamma", shared[0]]
    assert cal.for_head(["x"]) == shared
    # order by hash, not by file: the same set whatever the file order
    again = load_calibration([tmp_path / "c.txt", tmp_path / "b.csv", tmp_path / "a.jsonl"],
                             heads=["x", "y"])
    assert again.texts == cal.texts and again.sha256 == cal.sha256
    assert load_calibration([tmp_path / "a.jsonl"], limit=1).size == 1
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n{oops\n{"text": "t", "head": "z"}\n')
    with pytest.raises(DataError) as err:
        load_calibration([tmp_path / "bad.jsonl", tmp_path / "missing.txt"], heads=["x"])
    text = str(err.value)
    for problem in (f"{tmp_path / 'bad.jsonl'}:1: missing or empty text",
                    f"{tmp_path / 'bad.jsonl'}:2: not valid JSON",
                    f"{tmp_path / 'bad.jsonl'}:3: unknown head 'z'",
                    f"{tmp_path / 'missing.txt'}: no such file"):
        assert problem in text


# -- distillation ----------------------------------------------------------------------------


def _kl_to_sources(f, bundle: Path, texts: list[str]) -> float:
    model, tok = load_model(bundle)
    z = logits(model, tok, texts)
    total = 0.0
    for src, part in ((f["a"], slice(0, 2)), (f["b"], slice(2, 5))):
        sm, st = load_model(src)
        p = torch.log_softmax(logits(sm, st, texts), -1)
        q = torch.log_softmax(z[:, part], -1)
        total += float((p.exp() * (p - q)).sum(-1).mean())
    return total


def test_distillation_lowers_the_kl_to_every_teacher(family, tmp_path):
    merged = merge(_recipe(family, head_mode="owner"), tmp_path / "merged", progress=False)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(random_text(20, seed=500 + i) for i in range(160)))
    out = distill(merged, [texts], tmp_path / "distilled", epochs=3, lr=2e-3, batch_size=16,
                  max_length=32, dtype="float32", cache=str(tmp_path / "cache"), progress=False)
    before = _kl_to_sources(family, merged, family["held"])
    after = _kl_to_sources(family, out, family["held"])
    assert after < 0.5 * before
    manifest = json.loads((out / "guardmerge.json").read_text())
    assert manifest["heads"] == json.loads((merged / "guardmerge.json").read_text())["heads"]
    assert manifest["distillation"]["steps"] == 30 and manifest["distillation"]["texts"]["texts"] == 160
    assert set(manifest["distillation"]["teachers"]) == {str(family["a"]), str(family["b"])}
    # the runtime loads it unchanged, still one model for both heads
    from guardmerge import BundleClassifier

    clf = BundleClassifier.from_pretrained(out)
    assert [h.name for h in clf.heads] == ["a", "b"]
    # same options, same texts: the same bundle
    again = distill(merged, [texts], tmp_path / "again", epochs=3, lr=2e-3, batch_size=16,
                    max_length=32, dtype="float32", cache=str(tmp_path / "cache"), progress=False)
    assert _sha(again) == _sha(out)


def test_distill_refuses_a_changed_source_and_an_existing_output(family, tmp_path):
    import shutil

    merged = merge(_recipe(family, head_mode="owner"), tmp_path / "merged", progress=False)
    texts = tmp_path / "t.txt"
    texts.write_text("one two\nthree four\n")
    changed = tmp_path / "changed-a"
    shutil.copytree(family["a"], changed)
    manifest = json.loads((merged / "guardmerge.json").read_text())
    manifest["heads"][0]["source"]["id"] = str(changed)
    manifest["heads"][0]["source"]["sha256"] = "0" * 64
    (merged / "guardmerge.json").write_text(json.dumps(manifest))
    assert main(["distill", str(merged), "--texts", str(texts), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 2  # a changed source: a usage error
    assert main(["distill", str(merged), "--texts", str(texts), "-o", str(tmp_path / "o"),
                 "--source", f"a={family['a']}", "--steps", "1", "--max-length", "16",
                 "--no-progress"]) == 0
    assert main(["distill", str(merged), "--texts", str(texts), "-o", str(tmp_path / "o"),
                 "--source", f"a={family['a']}", "--no-progress"]) == 2  # exists
    assert main(["distill", str(merged), "--texts", str(texts), "-o", str(tmp_path / "p"),
                 "--source", "nohead=x"]) == 2


def _label_ce(bundle: Path, rows: list[dict]) -> float:
    """Mean cross-entropy of the bundle's heads on labelled rows (family heads a, b)."""
    model, tok = load_model(bundle)
    z = logits(model, tok, [r["text"] for r in rows])
    parts = {"a": (slice(0, 2), ["x", "y"]), "b": (slice(2, 5), ["p", "q", "r"])}
    ce = [torch.nn.functional.cross_entropy(z[i:i + 1, parts[r["head"]][0]],
                                            torch.tensor([parts[r["head"]][1].index(r["label"])]))
          for i, r in enumerate(rows)]
    return float(torch.stack(ce).mean())


def test_distillation_with_labels_fits_them_and_without_ignores_them(family, tmp_path):
    merged = merge(_recipe(family, head_mode="owner"), tmp_path / "merged", progress=False)
    # labels no source predicts (the text's first word decides), plus unlabelled rows
    marker = {"x": "bread", "y": "attack", "p": "poem", "q": "tree", "r": "travel"}
    rows = []
    for i in range(60):
        head = "a" if i % 2 else "b"
        label = ["x", "y"][i // 2 % 2] if head == "a" else ["p", "q", "r"][i // 2 % 3]
        rows.append({"text": f"{marker[label]} {random_text(10, seed=700 + i)}", "head": head,
                     "label": label})
    unlabelled = [{"text": random_text(12, seed=900 + i)} for i in range(20)]
    labelled_file = tmp_path / "labelled.jsonl"
    labelled_file.write_text("".join(json.dumps(r) + "\n" for r in rows + unlabelled))
    plain_file = tmp_path / "plain.jsonl"
    plain_file.write_text("".join(json.dumps({"text": r["text"], "head": r["head"]}) + "\n"
                                  for r in rows) +
                          "".join(json.dumps(r) + "\n" for r in unlabelled))
    kw = dict(epochs=16, lr=2e-3, batch_size=16, max_length=32, dtype="float32",
              cache=str(tmp_path / "cache"), progress=False)
    short = {**kw, "steps": 3}
    # weight 0: labels are not even read (a label no head has is no error) and change nothing
    odd = {"text": "an odd row", "head": "a"}
    with_bad = tmp_path / "with-bad.jsonl"
    with_bad.write_text(labelled_file.read_text() + json.dumps({**odd, "label": "zzz"}) + "\n")
    without = tmp_path / "without.jsonl"
    without.write_text(plain_file.read_text() + json.dumps(odd) + "\n")
    assert _sha(distill(merged, [with_bad], tmp_path / "p3", **short)) == \
        _sha(distill(merged, [without], tmp_path / "s3", **short))
    with pytest.raises(DataError, match=r"with-bad.jsonl:81: head 'a' has no label 'zzz'"):
        distill(merged, [with_bad], tmp_path / "bad", label_weight=1.0, **short)
    with pytest.raises(ConfigError, match="no text among the 2 kept by limit=2 in"):
        distill(merged, [plain_file], tmp_path / "lim", label_weight=1.0, limit=2, **short)
    pure = distill(merged, [labelled_file], tmp_path / "pure", **kw)
    supervised = distill(merged, [labelled_file], tmp_path / "sup", label_weight=5.0, **kw)
    assert _label_ce(supervised, rows) < 0.6 * _label_ce(pure, rows)
    record = json.loads((supervised / "guardmerge.json").read_text())["distillation"]
    assert record["options"]["label_weight"] == 5.0
    assert record["texts"]["labelled"] == 60 and len(record["texts"]["labels_sha256"]) == 64
    first, last = record["mean_ce_first_epoch"], record["mean_ce_last_epoch"]
    assert set(first) == {"a", "b"} and all(last[h] < first[h] for h in first)
    pure_record = json.loads((pure / "guardmerge.json").read_text())["distillation"]
    assert "labelled" not in pure_record["texts"]
    # no label anywhere: asking for the supervised term is an error, not a silent no-op
    with pytest.raises(ConfigError, match="no text .* has a label"):
        distill(merged, [plain_file], tmp_path / "none", label_weight=1.0, **kw)
    assert main(["distill", str(merged), "--texts", str(plain_file), "-o", str(tmp_path / "n"),
                 "--label-weight", "1", "--no-progress"]) == 2  # the CLI: a usage error
    assert main(["distill", str(merged), "--texts", str(labelled_file), "-o",
                 str(tmp_path / "c"), "--label-weight", "1", "--steps", "1", "--max-length", "16",
                 "--no-progress", "--cache", str(tmp_path / "cache")]) == 0
    record = json.loads((tmp_path / "c" / "guardmerge.json").read_text())["distillation"]
    assert record["options"]["label_weight"] == 1.0 and record["texts"]["labelled"] == 60


def test_distillation_label_rows_are_checked_with_file_and_line(tmp_path):
    heads = [Head("tox", ("ok", "bad")), Head("topics", ("a", "b", "c"), offset=2,
                                                 kind=MULTI_LABEL)]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"text": "one", "head": "tox", "label": "bad"},
        {"text": "two", "label": "bad"},                              # no head
        {"text": "three", "head": "tox", "label": "worse"},           # not a label of tox
        {"text": "four", "head": "tox", "label": ["ok"]},             # a list, single-label
        {"text": "one", "head": "tox", "label": "ok"},                # disagrees with line 1
        {"text": "five", "head": "topics", "label": ["a"]},
        {"text": "five", "head": "topics", "label": "c"},             # merged with line 6
        {"text": "six", "head": "topics", "label": []},               # none of its labels
        {"text": "seven", "head": ["tox"], "label": "ok"},            # a head must be a name
    ]) + "\n")
    with pytest.raises(DataError) as err:
        load_calibration(f, labels=heads)
    msg = str(err.value)
    for where, what in ((2, "needs the row's head"), (3, "has no label 'worse'"),
                        (4, "single-label"), (5, f"{f}:1 labels the same text 'bad'"),
                        (9, "head must be a head's name, got ['tox']")):
        assert f"{f}:{where}: " in msg and what in msg, (where, msg)
    assert f"{f}:6" not in msg and f"{f}:7" not in msg and f"{f}:8" not in msg
    # the good rows alone; labels are ignored where not asked for
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[i] for i in (0, 5, 6, 7)) + "\n")
    cal = load_calibration(f, labels=heads)
    got = dict(zip(cal.texts, cal.labels))
    assert got == {"one": {"tox": "bad"}, "five": {"topics": ("a", "c")}, "six": {"topics": ()}}
    assert cal.labelled == 3 and load_calibration(f).labels == ()
    # the targets distillation trains on, and its cross-entropy, by hand
    from guardmerge.merge.distillation import _label_targets, _supervised

    targets = _label_targets(heads, cal.labels)
    order = list(cal.texts)
    head, y, mask = targets["topics"]
    assert head is heads[1]
    assert mask.tolist() == [t != "one" for t in order]
    assert y[order.index("five")].tolist() == [1.0, 0.0, 1.0] and y[order.index("six")].sum() == 0
    z = torch.tensor([[0.5, -0.5, 1.0, -1.0, 2.0]] * 3)
    total, parts = _supervised(z, [0, 1, 2], targets)
    ce_tox = torch.log1p(torch.exp(torch.tensor(1.0)))  # -log softmax([0.5, -0.5])[1]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    topic_sum = sum(float(bce(z[0, 2:], y[order.index(t)], reduction="sum"))
                    for t in ("five", "six"))
    assert parts["tox"][1] == 1 and parts["tox"][0] == pytest.approx(float(ce_tox), rel=1e-5)
    assert parts["topics"] == (pytest.approx(topic_sum, rel=1e-5), 2)
    assert float(total) == pytest.approx(float(ce_tox) + topic_sum, rel=1e-5)


# -- the mergeability report and the collapse warning ----------------------------------------


def test_dry_run_reports_task_vector_figures_and_writes_nothing(family, tmp_path, capsys):
    r = mergeability(_recipe(family))
    base = load_file(str(family["base"] / "model.safetensors"))
    srcs = [load_file(str(family[k] / "model.safetensors")) for k in ("a", "b")]
    deltas = [{n: s[n].double() - base[n[len("bert."):]].double() for n in s
               if n.startswith("bert.") and s[n].is_floating_point()} for s in srcs]
    norms = [sum(float(d.pow(2).sum()) for d in ds.values()) ** 0.5 for ds in deltas]
    dot = sum(float((deltas[0][n] * deltas[1][n]).sum()) for n in deltas[0])
    assert r.norms == pytest.approx(norms, rel=1e-5)
    assert r.cosine[0][1] == pytest.approx(dot / (norms[0] * norms[1]), abs=1e-5)
    assert r.interference == pytest.approx([norms[1] / norms[0], norms[0] / norms[1]], rel=1e-4)
    assert all(sum(share.values()) == pytest.approx(1.0) for share in r.layer_share)
    assert r.warnings == []  # independent changes: cosine ~0, ~50% conflicts, similar sizes
    assert any("head_mode: refit" in n for n in r.notes)  # ...but every head's features move
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(family)))
    assert main(["merge", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "sign conflicts" in out and "note:" in out
    assert list(tmp_path.iterdir()) == [recipe]
    plain = {k: v for k, v in _recipe(family).items() if k not in ("calibration", "refit")}
    same = mergeability({**plain, "models": [{"model": str(family["a"]), "head": "x"},
                                             {"model": str(family["a"]), "head": "y"}]})
    assert same.cosine[0][1] == pytest.approx(1.0) and same.sign_conflict[0][1] == 0.0
    assert same.warnings == []
    # a source that undoes another, and one that goes three times as far: warnings name them
    import shutil

    from safetensors.torch import save_file

    base = load_file(str(family["base"] / "model.safetensors"))
    a = load_file(str(family["a"] / "model.safetensors"))
    for name, scale in (("undo", -1.0), ("far", 3.0)):
        folder = tmp_path / name
        shutil.copytree(family["a"], folder)
        moved = {n: (base[n[5:]] + scale * (t - base[n[5:]]) if n.startswith("bert.")
                     and t.is_floating_point() else t) for n, t in a.items()}
        save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    pair = lambda other: mergeability({**plain, "models": [  # noqa: E731
        {"model": str(family["a"]), "head": "a"}, {"model": str(tmp_path / other), "head": "o"}]})
    undo = pair("undo")
    assert undo.cosine[0][1] == pytest.approx(-1.0) and undo.sign_conflict[0][1] == 1.0
    assert any("pull the encoder apart" in w for w in undo.warnings)
    assert any("opposite directions" in w for w in undo.warnings)
    far = pair("far")
    assert far.cosine[0][1] == pytest.approx(1.0)
    assert any("3.0x" in w and "dominated" in w for w in far.warnings)


def _report(head: str, labels: list[str], truth: list[str], pred: list[str]) -> EvalReport:
    m = metrics(truth, pred, labels)
    rep = EvalReport(model="m")
    rep.heads[head] = HeadReport(head=head, labels=labels, n=m["n"], accuracy=m["accuracy"],
                                 macro_f1=m["macro_f1"], per_label=m["per_label"],
                                 confusion=m["confusion"])
    return rep


def test_the_collapse_warning_fires_only_where_the_source_did_not_collapse():
    truth = ["neg"] * 50 + ["pos"] * 50
    merged = _report("sentiment", ["neg", "pos"], truth, ["pos"] * 99 + ["neg"])
    source = _report("sentiment", ["neg", "pos"], truth, truth)
    warnings = collapse_warnings(merged, {"sentiment": source})
    assert warnings == ["head 'sentiment' predicts 'pos' for 99% of its 100 texts, where its "
                        "source predicts 'neg' for at most 50%: the merged head has collapsed "
                        "(try head_mode: refit, or distil)"]
    assert collapse_warnings(merged, {"sentiment": merged}) == []  # the source did too
    assert len(collapse_warnings(merged)) == 1                      # vs the data's labels
    skewed = _report("s", ["neg", "pos"], ["pos"] * 99 + ["neg"], ["pos"] * 100)
    assert collapse_warnings(skewed) == []                          # the data is that skewed


def test_eval_cli_prints_the_collapse_warning(tmp_path, tokenizer, capsys):
    from safetensors.torch import save_file

    from guardmerge.testing import build_bundle

    bundle = build_bundle(tmp_path / "b", {"topic": ["chat", "code", "travel"]}, tokenizer=tokenizer)
    weights = load_file(str(bundle / "model.safetensors"))
    weights["classifier.bias"] = torch.tensor([0.0, 50.0, 0.0])  # always "code"
    save_file(weights, str(bundle / "model.safetensors"), metadata={"format": "pt"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"hello number {i}", "head": "topic",
                                          "label": ["chat", "code", "travel"][i % 3]})
                              for i in range(30)))
    assert main(["eval", str(bundle), str(data)]) == 0
    err = capsys.readouterr().err
    assert "warning: head 'topic' predicts 'code' for 100% of its 30 texts, where the data's " \
           "most common label covers 33%" in err


# -- review regressions ----------------------------------------------------------------------


def test_regmean_with_fewer_rows_than_inputs_keeps_the_mean_off_their_span():
    g = torch.Generator().manual_seed(7)
    d_in, n = 20, 5
    w1, w2 = torch.randn(3, d_in, generator=g), torch.randn(3, d_in, generator=g)
    x1 = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    x2 = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    got = regmean([w1, w2], [x1.T @ x1 / n, x2.T @ x2 / n], alpha=1.0).double()
    mean = (w1 + w2).double() / 2
    # on the rows' span it solves the regression exactly; off it, it is the sources' mean
    x = torch.cat([x1, x2])
    y = torch.cat([x1 @ w1.double().T, x2 @ w2.double().T])
    assert torch.allclose(x @ got.T, x @ torch.linalg.lstsq(x, y).solution, atol=1e-4)
    _, _, vh = torch.linalg.svd(x)
    null = vh[x.shape[0]:]  # directions no calibration row spans
    assert torch.allclose(got @ null.T, mean @ null.T, atol=1e-5)
    assert float(got.norm()) < 2 * float(max(w1.norm(), w2.norm()))


def test_regmean_averages_every_tensor_that_is_not_a_linear_weight(family, tmp_path):
    out = merge(_recipe(family, method="regmean", head_mode="owner"), tmp_path / "rm",
                progress=False)
    merged = load_file(str(out / "model.safetensors"))
    a = load_file(str(family["a"] / "model.safetensors"))
    b = load_file(str(family["b"] / "model.safetensors"))
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                 "bert.encoder.layer.0.attention.self.query.bias",
                 "bert.encoder.layer.1.output.dense.bias"):
        assert torch.allclose(merged[name], (a[name] + b[name]) / 2, atol=1e-6), name
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged[q], (a[q] + b[q]) / 2, atol=1e-4)  # solved, not averaged


def test_statistics_recomputed_from_scratch_give_the_same_bundle(family, tmp_path):
    r = _recipe(family, method="regmean", head_mode="refit")
    r["calibration"] = {**r["calibration"], "cache": str(tmp_path / "one")}
    first = merge(r, tmp_path / "a", progress=False)
    r["calibration"] = {**r["calibration"], "cache": str(tmp_path / "two")}
    second = merge(r, tmp_path / "b", progress=False)
    assert _sha(first) == _sha(second)
    # query, key and value read the same input: one Gram matrix on disk, shared
    files = sorted((tmp_path / "one" / "statistics").glob("gram-*.safetensors"))
    assert len(files) == 2  # one per source
    stats = files[0]
    from safetensors import safe_open

    with safe_open(str(stats), "pt") as f:
        names = set(f.keys())
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert "bert.encoder.layer.0.attention.self.key" not in names


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_data_aware_search_trial_is_exactly_the_saved_best_bundle(family, tmp_path, dtype):
    from guardmerge import BundleClassifier
    from guardmerge.merge import Example, SearchOptions, evaluate, run_search

    heads = {"a": ["x", "y"], "b": ["p", "q", "r"]}
    examples = [Example(random_text(15, seed=700 + i), h, heads[h][i % len(heads[h])])
                for i in range(24) for h in heads]
    r = _recipe(family, method="regmean", head_mode="refit")
    summary = run_search(r, examples, tmp_path / "s", SearchOptions(
        trials=2, seed=1, methods=("regmean", "ties"), alpha_range=(0.5, 1.0), dtype=dtype,
        compare_sources=False, report=True, progress=False))
    best = summary["best"]
    saved = BundleClassifier.from_pretrained(summary["best_bundle"], dtype=dtype)
    assert evaluate(saved, examples).mean_macro_f1 == pytest.approx(best["score"], abs=1e-9)
    manifest = json.loads((Path(summary["best_bundle"]) / "guardmerge.json").read_text())
    assert manifest["recipe"]["method"] == best["method"]
    assert manifest["recipe"]["parameters"]["alpha"] == best["alpha"]
    report = Path(summary["report"]).read_text()
    assert "head mode `refit`" in report and "sha256" in report and "varied per trial" in report


def test_user_errors_in_data_aware_recipes_are_clear_and_write_nothing(family, tmp_path, capsys):
    with pytest.raises(RecipeError, match="calibration: expected a mapping"):
        MergeRecipe.from_dict({**_recipe(family, method="regmean"), "calibration": None})
    with pytest.raises(RecipeError, match="needs calibration texts"):
        MergeRecipe(base="b", models=(), method="regmean")
    # every calibration text names head a: source b would have none
    only_a = tmp_path / "only-a.jsonl"
    only_a.write_text("\n".join(json.dumps({"text": f"t {i}", "head": "a"}) for i in range(5)))
    r = _recipe(family, method="regmean")
    r["calibration"] = {**r["calibration"], "texts": str(only_a)}
    with pytest.raises(DataError, match="no calibration texts for .*b"):
        merge(r, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    # a search that would try RegMean without calibration texts: refused before writing
    plain = tmp_path / "plain.yaml"
    plain.write_text(json.dumps({k: v for k, v in _recipe(family).items()
                                 if k not in ("calibration", "refit")}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello", "head": "a", "label": "x"}) + "\n")
    assert main(["search", str(plain), "--eval", str(data), "--methods", "regmean", "-o",
                 str(tmp_path / "s"), "--trials", "1"]) == 2
    assert "need calibration texts" in capsys.readouterr().err
    assert not (tmp_path / "s" / "trials.jsonl").exists()


def test_the_dry_run_reads_the_calibration_texts(family, tmp_path, capsys):
    r = _recipe(family, method="regmean")
    report = mergeability(r)
    assert report.calibration == load_calibration(family["calibration"], heads=["a", "b"]).describe()
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**r, "calibration": {"texts": str(tmp_path / "missing.txt")}}))
    before = sorted((family["dir"] / "cache").rglob("*")) if (family["dir"] / "cache").exists() else []
    assert main(["merge", str(bad), "--dry-run"]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    after = sorted((family["dir"] / "cache").rglob("*")) if (family["dir"] / "cache").exists() else []
    assert before == after  # a dry run computes no statistics
