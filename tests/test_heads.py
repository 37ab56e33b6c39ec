"""Multi-label heads, per-head modules through the merge's data-aware steps, the search and
distillation, the Hub path offline, tokenizer and head-kind checks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from guardmerge import (BundleClassifier, ClassifierError, FunctionClassifier, Guard, Head,
                        MergeError, ModelLoadError, Policy, inspect_bundle)
from guardmerge.classifier import validate_scores
from guardmerge.merge import (Example, MergeRecipe, distill, evaluate, load_examples, merge,
                              metrics, run_search)
from guardmerge.merge.evaluation import multilabel_metrics
from guardmerge.merge.search import SearchOptions, TrialContext, trial_params
from guardmerge.testing import (add_to_hub_cache, build_base_folder, build_classifier_folder,
                                build_tokenizer, random_text)

JB = ["benign", "jailbreak"]
TOX = ["insult", "threat", "obscene"]
HEADS = (Head("jailbreak", tuple(JB), 0), Head("toxicity", tuple(TOX), 2, kind="multi_label"))


# -- multi-label heads: scores, validation, policies, metrics ------------------------------------

def test_a_sigmoid_heads_labels_are_independent_and_a_softmax_heads_must_sum_to_one():
    scores = {"jailbreak": {"jailbreak": 0.3}, "toxicity": {"insult": 0.9, "threat": 0.8}}
    clf = FunctionClassifier(HEADS, lambda t: scores)
    r = clf.classify(["you are an idiot and I will find you"])[0]
    assert r.heads["toxicity"].scores == {"insult": 0.9, "threat": 0.8, "obscene": 0.0}
    assert r.heads["toxicity"].predicted == ("insult", "threat")  # p >= 0.5, independently
    assert r.heads["jailbreak"].scores == {"benign": pytest.approx(0.7), "jailbreak": 0.3}
    assert r.heads["jailbreak"].predicted == "benign"
    validate_scores([r], 1, HEADS, "f")  # 1.7 is fine for a sigmoid head
    soft = (Head("toxicity", tuple(TOX), 0),)
    bad = FunctionClassifier(soft, lambda t: {"toxicity": {"insult": 0.9, "threat": 0.8}})
    with pytest.raises(ClassifierError, match=r"head 'toxicity', window 0: probabilities sum "
                                              r"to 1\.7.*single-label"):
        validate_scores(bad.classify(["x"]), 1, soft, "f")


def test_policies_fire_on_each_sigmoid_label_and_a_bad_softmax_fails_closed():
    policy = Policy.from_yaml("""
input:
  rules:
    - {id: insult, head: toxicity, labels: [insult], flag: 0.5, block: 0.95}
    - {id: threat, head: toxicity, labels: [threat], block: 0.7}
    - {id: jb, head: jailbreak, labels: [jailbreak], block: 0.9}
""")
    scores = {"jailbreak": {"jailbreak": 0.1}, "toxicity": {"insult": 0.9, "threat": 0.8}}
    v = Guard(FunctionClassifier(HEADS, lambda t: scores), policy).check_text("text")
    assert v.blocked
    assert sorted((f.rule, f.action.value, f.score) for f in v.findings) == [
        ("insult", "flag", 0.9), ("threat", "block", 0.8)]
    # the same numbers from a softmax head are not a distribution: a guard failure (on_error)
    soft = (Head("jailbreak", tuple(JB), 0), Head("toxicity", tuple(TOX), 2))
    v = Guard(FunctionClassifier(soft, lambda t: scores), policy).check_text("text")
    assert v.blocked and v.findings[0].kind == "error" and "sum to" in v.findings[0].detail


def test_multilabel_metrics_against_hand_computed_values():
    truth = [("insult",), ("insult", "threat"), (), ("threat",)]
    preds = [("insult",), ("insult",), ("insult",), ("threat", "obscene")]
    m = multilabel_metrics(truth, preds, TOX)
    # insult: tp 2, fp 1, fn 0 -> p 2/3, r 1, f1 0.8; threat: tp 1, fp 0, fn 1 -> f1 2/3;
    # obscene: tp 0, fp 1 -> f1 0
    assert m["per_label"]["insult"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_label"]["threat"]["f1"] == pytest.approx(2 / 3)
    assert m["per_label"]["obscene"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert m["accuracy"] == 0.25  # exact match: only the first text
    assert m["confusion"][0] == [[1, 1], [0, 2]]  # insult [[tn, fp], [fn, tp]]
    assert metrics(["a", "b"], ["a", "a"], ["a", "b"])["macro_f1"] == pytest.approx((2 / 3) / 2)


def test_evaluate_groups_a_multi_label_texts_rows_and_reads_list_labels(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": "t1", "head": "toxicity", "label": "insult"},
            {"text": "t1", "head": "toxicity", "label": "threat"},  # same text: both labels
            {"text": "t2", "head": "toxicity", "label": []},        # none of them
            {"text": "t3", "head": "toxicity", "label": ["obscene"]},
            {"text": "t1", "head": "jailbreak", "label": "benign"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples([data], heads=HEADS)
    probs = {"t1": {"insult": 0.9, "threat": 0.6}, "t2": {"insult": 0.7}, "t3": {"obscene": 0.4}}
    clf = FunctionClassifier(HEADS, lambda t: {"toxicity": probs[t], "jailbreak": {"benign": 0.8}})
    report = evaluate(clf, examples)
    tox = report.heads["toxicity"]
    assert tox.kind == "multi_label" and tox.n == 3  # three texts, not four rows
    assert tox.per_label["insult"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert tox.per_label["obscene"]["f1"] == 0.0 and tox.accuracy == pytest.approx(1 / 3)
    assert report.heads["jailbreak"].kind == "single_label"
    assert "exact-match accuracy" in report.render()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "head": "jailbreak", "label": ["benign"]}))
    with pytest.raises(Exception, match="jailbreak' is single-label: give one label"):
        load_examples([bad], heads=HEADS)


def test_regression_heads_are_refused(tmp_path, tokenizer):
    reg = build_classifier_folder(tmp_path / "score-model", ["score"], tokenizer=tokenizer,
                                  problem_type="regression")
    with pytest.raises(ModelLoadError, match=r"config\.json: a regression head \(problem_type: "
                                             r"regression\)"):
        BundleClassifier.from_pretrained(reg)
    one = build_classifier_folder(tmp_path / "one-output", ["x"], tokenizer=tokenizer)
    with pytest.raises(ModelLoadError, match="one output and no problem_type"):
        inspect_bundle(one)
    base, _ = build_base_folder(tmp_path / "base", tokenizer=tokenizer)
    with pytest.raises(ModelLoadError, match="score-model.*regression head"):
        merge({"base": str(base), "models": [{"model": str(reg)}]}, tmp_path / "out",
              progress=False)
    # one sigmoid output is a fine head (a "toxic" probability)
    ok = build_classifier_folder(tmp_path / "toxic", ["toxic"], tokenizer=tokenizer,
                                 multi_label=True)
    assert inspect_bundle(ok).heads[0].kind == "multi_label"


# -- per-head modules through RegMean, re-fit, search and distillation ----------------------------

@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """RoBERTa-family sources fine-tuned apart (their encoders differ from the base), one
    softmax and one multi-label head, and calibration texts."""
    d = tmp_path_factory.mktemp("roberta")
    tok = build_tokenizer(family="roberta")
    base, state = build_base_folder(d / "base", tokenizer=tok, family="roberta", max_position=32)
    jb = build_classifier_folder(d / "jb", JB, tokenizer=tok, family="roberta", seed=1,
                                 base_state=state, noise=0.05, max_position=32)
    tox = build_classifier_folder(d / "tox", TOX, tokenizer=tok, family="roberta", seed=2,
                                  base_state=state, noise=0.05, multi_label=True,
                                  max_position=32)
    calib = d / "calib.txt"
    calib.write_text("\n".join(random_text(12, seed=100 + i) for i in range(40)))
    return {"dir": d, "base": base, "jb": jb, "tox": tox, "calib": calib}


def _recipe(s, **kw):
    data = {"base": str(s["base"]), "method": "linear", "seed": 1,
            "models": [{"model": str(s["jb"]), "head": "jailbreak"},
                       {"model": str(s["tox"]), "head": "toxicity"}]}
    data.update(kw)
    return data


def test_regmean_and_refit_keep_head_modules_and_fit_each_heads_final_layer(drifted, tmp_path):
    cache = str(tmp_path / "cache")
    out = merge(_recipe(drifted, method="regmean", head_mode="refit",
                        calibration={"texts": [str(drifted["calib"])], "cache": cache},
                        refit={"texts": 40}), tmp_path / "b", progress=False)
    info = inspect_bundle(out)
    assert info.layout == "per_head"
    w = load_file(str(out / "guardmerge.safetensors"))
    for i, src in enumerate((drifted["jb"], drifted["tox"])):
        own = load_file(str(src / "model.safetensors"))
        assert torch.equal(w[f"heads.{i}.classifier.dense.weight"], own["classifier.dense.weight"])
        assert torch.equal(w[f"heads.{i}.classifier.dense.bias"], own["classifier.dense.bias"])
    manifest = json.loads((out / "guardmerge.json").read_text())
    for head in ("jailbreak", "toxicity"):  # fitted on the head's own modules' output
        kl = manifest["refit"]["heads"][head]
        assert kl["kl_after"] < kl["kl_before"]
    # the encoder was merged by RegMean, not copied: it differs from both sources
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(w[name], load_file(str(drifted["jb"] / "model.safetensors"))[name])
    # and the re-fit rows are what the runtime scores: the toxicity head is closer to its source
    texts = [random_text(12, seed=100 + i) for i in range(8)]
    src = AutoModelForSequenceClassification.from_pretrained(drifted["tox"]).eval()
    tok = AutoTokenizer.from_pretrained(drifted["tox"])
    with torch.no_grad():
        want = torch.sigmoid(src(**tok(texts, return_tensors="pt", padding=True)).logits)
    got = torch.tensor([[r.score("toxicity", lab) for lab in TOX]
                        for r in BundleClassifier.from_pretrained(out).classify(texts)])
    plain = merge(_recipe(drifted, head_mode="owner"), tmp_path / "plain", progress=False)
    before = torch.tensor([[r.score("toxicity", lab) for lab in TOX]
                           for r in BundleClassifier.from_pretrained(plain).classify(texts)])
    assert (got - want).abs().mean() < (before - want).abs().mean()


def test_a_search_trial_is_exactly_the_bundle_it_saves(drifted, tmp_path):
    recipe = MergeRecipe.from_dict(_recipe(drifted, method="dare_ties", head_mode="owner"))
    examples = [Example(random_text(10, seed=i), "jailbreak", JB[i % 2]) for i in range(6)] + \
        [Example(random_text(10, seed=50 + i), "toxicity", TOX[i % 3]) for i in range(6)]
    ctx = TrialContext(recipe, examples)
    params = trial_params(SearchOptions(seed=4), 1, recipe)
    ctx.load(params)
    texts = [e.text for e in examples]
    trial = ctx.runtime.classify(texts)
    best = merge(replace(recipe, seed=params.seed).with_densities(params.densities),
                 tmp_path / "best", progress=False)
    saved = BundleClassifier.from_pretrained(best).classify(texts)
    for a, b in zip(trial, saved):
        for head in ("jailbreak", "toxicity"):
            for lab, v in a.heads[head].scores.items():
                assert v == pytest.approx(b.heads[head].scores[lab], abs=1e-6)
    report = ctx.evaluate()
    assert report.heads["toxicity"].kind == "multi_label"
    summary = run_search(recipe, examples, tmp_path / "search", trials=2, compare_sources=False,
                         report=False, progress=False)
    assert set(summary["best"]["heads"]) == {"jailbreak", "toxicity"}
    assert inspect_bundle(summary["best_bundle"]).layout == "per_head"


def test_distilling_a_per_head_bundle_keeps_its_layout(drifted, tmp_path):
    bundle = merge(_recipe(drifted, head_mode="owner"), tmp_path / "b", progress=False)
    out = distill(bundle, [str(drifted["calib"])], tmp_path / "d", steps=2, batch_size=8,
                  cache=str(tmp_path / "cache"), progress=False, dtype="float32")
    info = inspect_bundle(out)
    assert info.layout == "per_head" and (out / "guardmerge.safetensors").exists()
    assert [h.kind for h in info.heads] == ["single_label", "multi_label"]
    before = load_file(str(bundle / "guardmerge.safetensors"))
    after = load_file(str(out / "guardmerge.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["heads.1.classifier.dense.weight"],
                           after["heads.1.classifier.dense.weight"])  # trained, still per head
    BundleClassifier.from_pretrained(out).classify(["hello world"])


# -- tokenizers compared across sources -----------------------------------------------------------

def test_different_bpe_merges_are_a_merge_error(drifted, tmp_path):
    other = tmp_path / "tox-other-merges"
    shutil.copytree(drifted["tox"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]
    (other / "tokenizer.json").write_text(json.dumps(data))
    recipe = _recipe(drifted)
    recipe["models"][1]["model"] = str(other)
    with pytest.raises(MergeError, match=r"tox-other-merges\): BPE merges differs from .*jb's "
                                         r"\(\d+ vs \d+ merges, first difference at 3\)"):
        merge(recipe, tmp_path / "out", progress=False)


def test_a_bpe_source_without_tokenizer_json_reads_vocab_json_and_merges_txt(drifted, tmp_path):
    slim = tmp_path / "jb-vocab-files"
    shutil.copytree(drifted["jb"], slim)
    (slim / "tokenizer.json").unlink()
    a = BundleClassifier.from_pretrained(slim).classify(["hello world xyzzy"])[0]
    b = BundleClassifier.from_pretrained(drifted["jb"]).classify(["hello world xyzzy"])[0]
    assert a.heads["jb-vocab-files"].scores == pytest.approx(b.heads["jb"].scores, abs=1e-6)
    recipe = _recipe(drifted)
    recipe["models"][0]["model"] = str(slim)  # compared through vocab.json + merges.txt
    out = merge(recipe, tmp_path / "out", progress=False)
    assert (out / "merges.txt").read_bytes() == (drifted["jb"] / "merges.txt").read_bytes()


def test_sentencepiece_models_are_copied_whole_and_compared(tmp_path):
    tok = build_tokenizer(family="deberta-v2")
    base, state = build_base_folder(tmp_path / "base", tokenizer=tok, family="deberta-v2")
    a = build_classifier_folder(tmp_path / "a", JB, tokenizer=tok, family="deberta-v2",
                                base_state=state, seed=1)
    b = build_classifier_folder(tmp_path / "b", TOX, tokenizer=tok, family="deberta-v2",
                                base_state=state, seed=2, multi_label=True)
    spm = bytes(range(256)) * 4  # stands in for a SentencePiece model file (sentencepiece is
    for f in (a, b):             # not installed: the tokenizer itself loads from tokenizer.json)
        (f / "spm.model").write_bytes(spm)
    recipe = {"base": str(base), "models": [{"model": str(a)}, {"model": str(b)}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    assert (out / "spm.model").read_bytes() == spm
    BundleClassifier.from_pretrained(out).classify(["hello"])
    (b / "spm.model").write_bytes(spm[::-1])
    with pytest.raises(MergeError, match=r"models\[1\] .*: SentencePiece model differs"):
        merge(recipe, tmp_path / "out2", progress=False)


def _spm_only_folder(folder, spm):
    """A source as microsoft/deberta-v3-base ships its tokenizer: spm.model, no tokenizer.json."""
    (folder / "tokenizer.json").unlink()
    (folder / "spm.model").write_bytes(spm)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "DebertaV2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_real_sentencepiece_only_tokenizer_is_converted_once_into_the_bundle(tmp_path):
    spm_lib = pytest.importorskip("sentencepiece")  # in the [dev] extra: CI runs this
    import io

    from transformers import DebertaV2Tokenizer

    from guardmerge.testing import WORDS

    model = io.BytesIO()
    sentences = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(9)) for i in range(400)]
    spm_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"], hard_vocab_limit=False, minloglevel=2)
    spm = model.getvalue()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spm.model").write_bytes(spm)
    tok = DebertaV2Tokenizer.from_pretrained(tmp_path / "tok")  # converted by sentencepiece
    base, state = build_base_folder(tmp_path / "base", tokenizer=tok, family="deberta-v2")
    src = build_classifier_folder(tmp_path / "a", JB, tokenizer=tok, family="deberta-v2",
                                  base_state=state, seed=1)
    for folder in (base, src):
        _spm_only_folder(folder, spm)
    out = merge({"base": str(base), "models": [{"model": str(src)}]}, tmp_path / "out",
                progress=False)
    assert (out / "spm.model").read_bytes() == spm and (out / "tokenizer.json").exists()
    text = " ".join(WORDS[:40])
    ref_tok = AutoTokenizer.from_pretrained(src)  # the source's own, from spm.model
    bundle_tok = AutoTokenizer.from_pretrained(out)  # the bundle's, from tokenizer.json
    assert bundle_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert len(ref_tok(text)["input_ids"]) > 20  # real pieces, not all [UNK]
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(src)(
            **ref_tok(text, return_tensors="pt")).logits.softmax(-1)[0]
    got = BundleClassifier.from_pretrained(out).classify([text])[0].heads["a"].scores
    assert [got[label] for label in JB] == pytest.approx(ref.tolist(), abs=1e-5)


def test_a_sentencepiece_only_tokenizer_without_the_packages_says_what_to_install(tmp_path,
                                                                                 monkeypatch):
    import guardmerge.classifier as classifier
    from transformers import AutoTokenizer as Auto

    tok = build_tokenizer(family="deberta-v2")
    src = _spm_only_folder(build_classifier_folder(tmp_path / "a", JB, tokenizer=tok,
                                                   family="deberta-v2"), b"not read")

    def without_sentencepiece(*args, **kwargs):  # what transformers raises without the packages
        raise ValueError("`tiktoken` is required to read a `tiktoken` file.")

    monkeypatch.setattr(classifier, "_has_sentencepiece", lambda: False)
    monkeypatch.setattr(Auto, "from_pretrained", without_sentencepiece)
    with pytest.raises(ModelLoadError, match=r"a: the tokenizer is a SentencePiece model "
                                             r"\(spm.model\) without tokenizer.json.*"
                                             r"guardmerge\[sentencepiece\]"):
        classifier.load_tokenizer(src)


# -- the Hub path, offline ------------------------------------------------------------------------

def test_hub_ids_resolve_offline_from_the_cache_with_a_pinned_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    tok = build_tokenizer(family="deberta-v2")
    d = tmp_path / "local"
    base, state = build_base_folder(d / "base", tokenizer=tok, family="deberta-v2")
    pi = build_classifier_folder(d / "pi", ["SAFE", "INJECTION"], tokenizer=tok,
                                 family="deberta-v2", base_state=state, noise=0.0, seed=1)
    old = build_classifier_folder(d / "tox-old", TOX, tokenizer=tok, family="deberta-v2",
                                  base_state=state, noise=0.0, seed=2, multi_label=True)
    new = build_classifier_folder(d / "tox-new", TOX, tokenizer=tok, family="deberta-v2",
                                  base_state=state, noise=0.0, seed=3, multi_label=True)
    a, b, c, e = "a" * 40, "b" * 40, "c" * 40, "e" * 40
    add_to_hub_cache(cache, "tiny/deberta-v3-base", base, commit=a)
    add_to_hub_cache(cache, "tiny/prompt-injection", pi, commit=b)
    add_to_hub_cache(cache, "tiny/toxicity", old, commit=c, refs=())  # an older commit
    add_to_hub_cache(cache, "tiny/toxicity", new, commit=e)           # main
    assert (cache / "models--tiny--toxicity" / "refs" / "main").read_text() == e
    assert (cache / "models--tiny--toxicity" / "snapshots" / c / "config.json").is_symlink()
    clf = BundleClassifier.from_pretrained("tiny/prompt-injection")
    assert clf.heads[0].revision == b and clf.heads[0].name == "prompt-injection"
    out = merge({"base": "tiny/deberta-v3-base", "method": "linear", "head_mode": "owner",
                 "models": [{"model": "tiny/prompt-injection", "head": "injection"},
                            {"model": "tiny/toxicity", "revision": c, "head": "toxicity"}]},
                tmp_path / "bundle", progress=False)
    manifest = json.loads((out / "guardmerge.json").read_text())
    assert manifest["base"]["revision"] == a
    assert [(h["source"]["id"], h["source"]["revision"]) for h in manifest["heads"]] == [
        ("tiny/prompt-injection", b), ("tiny/toxicity", c)]
    got = BundleClassifier.from_pretrained(out).classify(["hello world"])[0].heads["toxicity"]
    for folder, match in ((old, True), (new, False)):  # the pinned commit, not main
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            want = torch.sigmoid(model(**tok("hello world", return_tensors="pt")).logits[0])
        close = torch.allclose(torch.tensor([got.scores[x] for x in TOX]), want, atol=1e-5)
        assert close is match
    with pytest.raises(ModelLoadError, match="tiny/toxicity.*Hugging Face Hub failed"):
        inspect_bundle("tiny/toxicity", revision="f" * 40)  # not in the cache, and offline


def test_the_deberta_v3_example_recipe_is_valid():
    from pathlib import Path

    recipe = MergeRecipe.load(Path(__file__).resolve().parent.parent / "examples" /
                              "recipe-deberta-v3.yaml")
    assert recipe.method == "ties" and recipe.head_mode.value == "refit"
    assert [m.model for m in recipe.models] == ["protectai/deberta-v3-base-prompt-injection-v2",
                                                "KoalaAI/Text-Moderation"]


def test_dry_run_measures_the_shared_encoder_only(drifted, capsys):
    from guardmerge.cli import main
    from guardmerge.merge import mergeability

    report = mergeability(_recipe(drifted))
    encoder = [n for n, t in load_file(str(drifted["jb"] / "model.safetensors")).items()
               if n.startswith("roberta.") and t.is_floating_point()]
    assert report.tensors == len(encoder)  # neither classifier.dense nor the output layer
    assert all(n > 0 for n in report.norms)
    recipe = drifted["dir"] / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe(drifted)))
    assert main(["merge", str(recipe), "--dry-run"]) == 0
    assert "jailbreak" in capsys.readouterr().out


def test_a_per_head_bundle_is_a_source_like_any_other(drifted, tmp_path):
    """Its heads keep their own modules (heads.<i>. renumbered) through a RegMean re-merge."""
    first = merge(_recipe(drifted, head_mode="owner"), tmp_path / "first", progress=False)
    again = merge({"base": str(drifted["base"]), "method": "regmean", "head_mode": "owner",
                   "calibration": {"texts": [str(drifted["calib"])],
                                   "cache": str(tmp_path / "cache")},
                   "models": [{"model": str(first)}]}, tmp_path / "again", progress=False)
    a = load_file(str(first / "guardmerge.safetensors"))
    b = load_file(str(again / "guardmerge.safetensors"))
    for i in (0, 1):
        assert torch.equal(a[f"heads.{i}.classifier.dense.weight"],
                           b[f"heads.{i}.classifier.dense.weight"])
    assert torch.equal(a["classifier.out_proj.weight"], b["classifier.out_proj.weight"])
    assert [h.kind for h in inspect_bundle(again).heads] == ["single_label", "multi_label"]


def test_a_per_head_merge_is_byte_identical_for_the_same_recipe_and_seed(drifted, tmp_path):
    import hashlib

    recipe = _recipe(drifted, method="dare_ties", head_mode="owner", seed=11,
                     parameters={"density": 0.5})
    shas = [hashlib.sha256((merge(recipe, tmp_path / f"m{i}", progress=False) /
                            "guardmerge.safetensors").read_bytes()).hexdigest() for i in (0, 1)]
    assert shas[0] == shas[1]
    other = merge(dict(recipe, seed=12), tmp_path / "m2", progress=False)
    assert hashlib.sha256((other / "guardmerge.safetensors").read_bytes()).hexdigest() != shas[0]
