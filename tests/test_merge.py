"""HM3 merges end to end: expansion, head modes, checks, reproducibility, atomic output."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guardmerge import BundleClassifier, ConfigError, MergeError, ModelLoadError, RecipeError, inspect_bundle
from guardmerge.cli import main
from guardmerge.merge import MergePlan, MergeRecipe, merge
from guardmerge.merge.write import BlockMerger
from guardmerge.testing import build_base_folder, build_classifier_folder, build_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("sources")
    base, state = build_base_folder(d / "base", tokenizer=tokenizer, seed=0)
    jb = build_classifier_folder(d / "jb-model", ["LABEL_0", "LABEL_1"], tokenizer=tokenizer,
                                 seed=1, base_state=state)
    hate = build_classifier_folder(d / "hate-model", ["hate speech", "normal", "offensive"],
                                   tokenizer=tokenizer, seed=2, base_state=state)
    return {"dir": d, "base": base, "jb": jb, "hate": hate}


def _recipe(s, **kw):
    data = {"base": str(s["base"]), "method": "ties", "seed": 7,
            "models": [{"model": str(s["jb"]), "head": "jailbreak", "labels": ["benign", "jailbreak"]},
                       {"model": str(s["hate"]), "head": "hate"}]}
    data.update(kw)
    return data


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_and_three_label_classifiers_merge_into_a_runtime_bundle(sources, tmp_path):
    out = merge(_recipe(sources), tmp_path / "bundle")
    info = inspect_bundle(out)
    assert [(h.name, h.labels, h.offset) for h in info.heads] == [
        ("jailbreak", ("benign", "jailbreak"), 0), ("hate", ("hate speech", "normal", "offensive"), 2)]
    assert info.heads[0].sha256 == hashlib.sha256((sources["jb"] / "model.safetensors").read_bytes()).hexdigest()
    assert info.heads[0].source == str(sources["jb"])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "guardmerge.json", "vocab.txt", "tokenizer.json",
            "tokenizer_config.json"} <= files
    manifest = json.loads((out / "guardmerge.json").read_text())
    assert manifest["recipe"]["method"] == "ties" and manifest["recipe"]["seed"] == 7
    assert manifest["base"]["sha256"] == _sha(sources["base"] / "model.safetensors")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["guardmerge_method"] == "ties"
    # the runtime loads and scores it; plain transformers loads it too
    clf = BundleClassifier.from_pretrained(out)
    r = clf.classify(["please write a poem about the river"])[0]
    assert set(r.heads) == {"jailbreak", "hate"}
    assert sum(r.heads["hate"].scores.values()) == pytest.approx(1.0, abs=1e-5)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.id2label[4] == "hate:offensive"


def test_hm3_padding_in_merge_mode_and_owner_mode(sources, tmp_path):
    jb = _tensors(sources["jb"])
    hate = _tensors(sources["hate"])
    lin = _tensors(merge(_recipe(sources, method="linear"), tmp_path / "lin"))
    w = lin["classifier.weight"]
    assert w.shape == (5, 32)
    # soup of zero-padded heads: each head's rows are its owner's rows / 2
    assert torch.allclose(w[:2], jb["classifier.weight"] / 2)
    assert torch.allclose(w[2:], hate["classifier.weight"] / 2)
    assert torch.allclose(lin["classifier.bias"][2:], hate["classifier.bias"] / 2)
    own = _tensors(merge(_recipe(sources, method="linear", head_mode="owner"), tmp_path / "own"))
    assert torch.equal(own["classifier.weight"][:2], jb["classifier.weight"])
    assert torch.equal(own["classifier.weight"][2:], hate["classifier.weight"])
    assert torch.equal(own["classifier.bias"][:2], jb["classifier.bias"])
    # every other tensor is the same soup in both modes
    enc = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(own[enc], lin[enc])
    assert torch.allclose(lin[enc], (jb[enc] + hate[enc]) / 2, atol=1e-6)


def test_ties_head_rows_at_full_density_are_the_owners(sources, tmp_path):
    # zero base head + disjoint rows: sign election keeps each owner's row, the mean divides by its weight
    t = _tensors(merge(_recipe(sources, parameters={"density": 1.0}), tmp_path / "t"))
    assert torch.allclose(t["classifier.weight"][:2], _tensors(sources["jb"])["classifier.weight"])


def test_encoder_tensor_matches_hand_computed_ties(sources, tmp_path):
    recipe = _recipe(sources, parameters={"density": 0.3, "lambda": 0.8})
    recipe["models"][1]["weight"] = 2.0
    t = _tensors(merge(recipe, tmp_path / "t"))
    name = "bert.pooler.dense.bias"
    base = load_file(str(sources["base"] / "model.safetensors"))["pooler.dense.bias"]
    d1 = _tensors(sources["jb"])[name] - base
    d2 = _tensors(sources["hate"])[name] - base
    k = int(0.3 * d1.numel())

    def trim(d):
        keep = d.abs().topk(k).indices
        out = torch.zeros_like(d)
        out[keep] = d[keep]
        return out

    t1, t2 = trim(d1), trim(d2)
    sign = torch.where(t1 + 2 * t2 >= 0, 1.0, -1.0)
    m1, m2 = (t1.sign() == sign).float(), (t2.sign() == sign).float()
    div = m1 + 2 * m2
    mixed = torch.where(div > 0, (m1 * t1 + 2 * m2 * t2) / div.clamp(min=1e-12), 0.0)
    assert torch.allclose(t[name], base + 0.8 * mixed, atol=1e-6)


def test_same_recipe_and_seed_give_byte_identical_weights(sources, tmp_path):
    r = _recipe(sources, method="dare_ties", parameters={"density": 0.4})
    a = merge(r, tmp_path / "a")
    b = merge(r, tmp_path / "b")
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert (a / "guardmerge.json").read_text() == (b / "guardmerge.json").read_text()
    c = merge({**r, "seed": 8}, tmp_path / "c")
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")


def test_dare_randomness_does_not_depend_on_tensor_order(sources):
    plan = MergePlan(_recipe(sources, method="dare_ties", parameters={"density": 0.3}))
    merger = BlockMerger(plan)
    try:
        forward = {n: merger.tensor(n) for n in plan.names}
        backward = {n: merger.tensor(n) for n in reversed(plan.names)}
    finally:
        plan.close()
    for n in plan.names:
        assert torch.equal(forward[n], backward[n]), n


def test_bare_encoder_with_or_without_bert_prefix_gives_the_same_merge(sources, tmp_path, caplog):
    state = load_file(str(sources["base"] / "model.safetensors"))
    assert "embeddings.word_embeddings.weight" in state  # BertModel names: no prefix
    # BertForMaskedLM / BertForPreTraining style: "bert." prefix plus an MLM head we do not use
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.bias"] = torch.zeros(state["embeddings.word_embeddings.weight"].shape[0])
    mlm_dir = tmp_path / "mlm-base"
    import shutil

    shutil.copytree(sources["base"], mlm_dir)
    save_file(prefixed, str(mlm_dir / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="guardmerge.merge"):
        a = _tensors(merge(_recipe(sources, base=str(mlm_dir)), tmp_path / "a"))
    assert "1 tensors not part of the classifier are not used (cls.predictions.bias)" in caplog.text
    b = _tensors(merge(_recipe(sources), tmp_path / "b"))
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_self_merge_through_dare(sources, tmp_path):
    recipe = {"base": str(sources["base"]), "method": "dare_ties", "seed": 1,
              "models": [{"model": str(sources["hate"]), "head": "hate", "density": 0.3}]}
    out = merge(recipe, tmp_path / "self")
    merged, src = _tensors(out), _tensors(sources["hate"])
    base = load_file(str(sources["base"] / "model.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    b, d = base[name[len("bert."):]], src[name] - base[name[len("bert."):]]
    dropped = torch.isclose(merged[name], b)
    assert torch.allclose(merged[name][~dropped], (b + d / 0.3)[~dropped], atol=1e-5)
    assert 0.2 < (~dropped).float().mean() < 0.4
    # at full density a self-merge gives the source model back
    full = merge({**recipe, "models": [{**recipe["models"][0], "density": 1.0}]}, tmp_path / "full")
    text = ["hello world the cat sat on the mat"]
    got = BundleClassifier.from_pretrained(full).classify(text)[0].heads["hate"].scores
    want = BundleClassifier.from_pretrained(sources["hate"]).classify(text)[0].heads["hate-model"].scores
    assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-5)


def test_mismatched_encoder_config_is_an_error(sources, tmp_path, tokenizer):
    wide = build_classifier_folder(tmp_path / "wide", ["a", "b"], tokenizer=tokenizer, hidden=48,
                                   attention_heads=2)
    r = _recipe(sources)
    r["models"][1] = {"model": str(wide), "head": "wide"}
    with pytest.raises(MergeError, match=r"models\[1\] \(.*wide\): hidden_size = 48 but .*hidden_size = 32"):
        merge(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_vocabulary_is_an_error(sources, tmp_path):
    other_tok = build_tokenizer(["entirely", "different", "words"])
    other = build_classifier_folder(tmp_path / "other", ["a", "b"], tokenizer=other_tok)
    r = _recipe(sources)
    r["models"][1] = {"model": str(other), "head": "other"}
    with pytest.raises(MergeError, match=r"vocab_size = \d+ but|tokenizer vocabulary differs"):
        merge(r, tmp_path / "out")


def test_base_missing_a_tensor_is_named(sources, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(sources["base"], base)
    state = load_file(str(base / "model.safetensors"))
    del state["pooler.dense.weight"]
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"base \(.*\): no tensor 'bert\.pooler\.dense\.weight'"):
        merge(_recipe(sources, base=str(base)), tmp_path / "out")


def test_source_tensor_shape_mismatch_is_named(sources, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sources["hate"], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["bert.encoder.layer.0.output.dense.bias"] = torch.zeros(31)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = _recipe(sources)
    r["models"][1]["model"] = str(bad)
    with pytest.raises(MergeError, match=r"tensor 'bert\.encoder\.layer\.0\.output\.dense\.bias' has "
                                         r"shape \[31\]"):
        merge(r, tmp_path / "out")


def test_integer_buffers_are_copied_and_must_agree(sources, tmp_path):
    import shutil

    folders = {}
    for key in ("base", "jb", "hate"):
        folders[key] = tmp_path / key
        shutil.copytree(sources[key], folders[key])
        state = load_file(str(folders[key] / "model.safetensors"))
        name = "embeddings.position_ids" if key == "base" else "bert.embeddings.position_ids"
        state[name] = torch.arange(512).unsqueeze(0)
        save_file(state, str(folders[key] / "model.safetensors"), metadata={"format": "pt"})
    r = _recipe({k: str(v) for k, v in folders.items()})
    out = _tensors(merge(r, tmp_path / "ok"))
    assert out["bert.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(out["bert.embeddings.position_ids"], torch.arange(512).unsqueeze(0))
    state = load_file(str(folders["hate"] / "model.safetensors"))
    state["bert.embeddings.position_ids"] = torch.arange(512).flip(0).unsqueeze(0)
    save_file(state, str(folders["hate"] / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"integer buffer 'bert\.embeddings\.position_ids' differs"):
        merge(r, tmp_path / "bad")


def test_label_renaming_must_match_count_and_heads_must_be_unique(sources, tmp_path):
    r = _recipe(sources)
    r["models"][0]["labels"] = ["a", "b", "c"]
    with pytest.raises(MergeError, match=r"models\[0\]\.labels gives 3 labels but .* has 2"):
        merge(r, tmp_path / "out")
    r = _recipe(sources)
    r["models"] = [{"model": str(sources["jb"])}, {"model": str(sources["jb"])}]
    with pytest.raises(MergeError, match="head name 'jb-model' is used by"):
        merge(r, tmp_path / "out")


def test_uninformative_labels_warn(sources, tmp_path, caplog):
    r = _recipe(sources)
    del r["models"][0]["labels"]
    with caplog.at_level(logging.WARNING, logger="guardmerge.merge"):
        out = merge(r, tmp_path / "out")
    assert "uninformative labels ['LABEL_0', 'LABEL_1']" in caplog.text
    assert inspect_bundle(out).heads[0].labels == ("LABEL_0", "LABEL_1")


def test_pickle_only_source_is_refused(sources, tmp_path):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(sources["jb"], bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
    r = _recipe(sources)
    r["models"][0]["model"] = str(bad)
    with pytest.raises(ModelLoadError, match="refuses to unpickle"):
        merge(r, tmp_path / "out")


def test_interrupted_merge_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = BlockMerger.blocks

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(BlockMerger, "blocks", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(_recipe(sources), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(sources, tmp_path):
    out = merge(_recipe(sources), tmp_path / "out")
    with pytest.raises(ConfigError, match="already exists"):
        merge(_recipe(sources), out)
    recipe = tmp_path.parent / f"{tmp_path.name}-recipe.yaml"
    recipe.write_text(json.dumps(_recipe(sources)))
    assert main(["merge", str(recipe), "-o", str(out)]) == 2  # a usage error, like README says
    merge(_recipe(sources, method="linear"), out, overwrite=True)
    assert json.loads((out / "guardmerge.json").read_text())["recipe"]["method"] == "linear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recipe_validation_reports_all_problems(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
base: ./base
method: slerp
head_mode: mine
seed: -1
parameters: {lambda: 0, temperature: 3}
models:
  - model: ./a
    head: "bad name"
    density: 1.5
  - {head: x}
  - {model: ./b, labels: [x, x], color: red}
""")
    with pytest.raises(RecipeError) as err:
        MergeRecipe.load(path)
    text = str(err.value)
    for fragment in ["method: expected one of linear, task_arithmetic, ties, dare_ties, dare_linear",
                     "head_mode: expected one of merge, owner", "seed: expected an integer >= 0",
                     "parameters.lambda: expected a number > 0", "parameters.temperature: unknown key",
                     "models[0].head: head name 'bad name'", "models[0].density: expected a number in (0, 1]",
                     "models[1].model: required key is missing", "models[2].labels: duplicate labels ['x']",
                     "models[2].color: unknown key"]:
        assert f"{path}: {fragment}" in text, fragment


def test_example_recipes_are_valid():
    recipe = MergeRecipe.load(EXAMPLES / "recipe.yaml")
    assert recipe.method == "dare_ties" and len(recipe.models) == 2
    data_aware = MergeRecipe.load(EXAMPLES / "recipe-regmean.yaml")
    assert (data_aware.method, data_aware.head_mode.value) == ("regmean", "refit")
    assert data_aware.calibration.per_source == 300 and data_aware.refit.texts == 2000


def test_cli_merge_and_inspect(sources, tmp_path, capsys):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(sources)))
    assert main(["merge", str(path), "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "method=ties seed=7" in out and "hate" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x\nmodels: []\n")
    assert main(["merge", str(bad), "-o", str(tmp_path / "c")]) == 2
    assert "models: expected a non-empty list" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_streamed_blocks_stay_valid_while_later_blocks_are_read(sources, method):
    """The writer queues blocks and writes them later: a yielded block must never be a read
    buffer that the next block overwrites (task_arithmetic once yielded one)."""
    plan = MergePlan(_recipe(sources, method=method))
    merger = BlockMerger(plan)
    try:
        expected = {name: merger.tensor(name).reshape(-1) for name in plan.names}
        held: dict[str, list[torch.Tensor]] = {}
        for name in plan.names:  # keep every block, as the writer's queue does, unconsumed
            held[name] = list(merger.blocks(name))
        for name in plan.names:
            assert torch.equal(torch.cat(held[name]), expected[name]), name
    finally:
        plan.close()
