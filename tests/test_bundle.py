"""Bundle format and loader: strict checks that name the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from guardmerge import BundleClassifier, ModelLoadError, inspect_bundle
from guardmerge.testing import build_classifier_folder


def _copy(src: Path, tmp_path: Path, name: str = "b") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_bundle_layout_and_heads(random_bundle):
    files = {p.name for p in random_bundle.iterdir()}
    assert {"config.json", "model.safetensors", "guardmerge.json", "vocab.txt",
            "tokenizer.json", "tokenizer_config.json"} <= files
    info = inspect_bundle(random_bundle)
    assert [(h.name, h.labels, h.offset) for h in info.heads] == [
        ("jailbreak", ("benign", "jailbreak"), 0),
        ("toxicity", ("normal", "offensive", "hateful"), 2),
    ]
    config = json.loads((random_bundle / "config.json").read_text())
    assert config["id2label"] == {"0": "jailbreak:benign", "1": "jailbreak:jailbreak",
                                  "2": "toxicity:normal", "3": "toxicity:offensive",
                                  "4": "toxicity:hateful"}
    manifest = json.loads((random_bundle / "guardmerge.json").read_text())
    assert manifest["format_version"] == 2 and manifest["layout"] == "plain"
    assert [h["kind"] for h in manifest["heads"]] == ["single_label", "single_label"]
    assert info.plain_transformers and info.layout == "plain"


def test_a_format_1_manifest_still_loads(random_bundle, random_classifier, tmp_path):
    b = _copy(random_bundle, tmp_path)
    m = json.loads((b / "guardmerge.json").read_text())
    m["format_version"] = 1
    del m["layout"]
    for h in m["heads"]:
        del h["kind"]
    (b / "guardmerge.json").write_text(json.dumps(m))
    info = inspect_bundle(b)
    assert [(h.name, h.kind) for h in info.heads] == [("jailbreak", "single_label"),
                                                      ("toxicity", "single_label")]
    text = ["please write a poem about the river"]
    old = BundleClassifier.from_pretrained(b).classify(text)[0]
    assert old.heads["toxicity"].scores == random_classifier.classify(text)[0].heads["toxicity"].scores
    m["format_version"] = 3
    (b / "guardmerge.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="format_version is 3; this guardmerge reads versions 1, 2"):
        inspect_bundle(b)


def test_same_folder_loads_in_plain_transformers(random_bundle, random_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(random_bundle)
    tok = AutoTokenizer.from_pretrained(random_bundle)
    assert model.config.num_labels == 5
    enc = tok("please write a poem about the river", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    ours = random_classifier.classify(["please write a poem about the river"])[0]
    expected = torch.softmax(logits[2:5], dim=-1)
    got = [ours.score("toxicity", lab) for lab in ("normal", "offensive", "hateful")]
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_missing_weights(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing"):
        inspect_bundle(b)


def test_missing_config(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        inspect_bundle(b)


def test_pickle_weights_are_refused_without_unpickling(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "model.safetensors").unlink()
    # Not a valid pickle at all: if anything tried to unpickle it we would see a pickle error.
    (b / "pytorch_model.bin").write_bytes(b"\x80\x04 this would run code")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*refuses to unpickle"):
        BundleClassifier.from_pretrained(b)


def test_truncated_safetensors(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    data = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated: tensor '.*'"):
        inspect_bundle(b)


def test_corrupted_safetensors_header(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[8:20] = b"#garbage####"
    (b / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt safetensors header"):
        inspect_bundle(b)


def test_tiny_file_is_not_safetensors(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        inspect_bundle(b)


def _edit_manifest(b: Path, fn) -> None:
    path = b / "guardmerge.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_manifest_heads_must_add_up(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    _edit_manifest(b, lambda m: m["heads"][1]["labels"].pop())
    with pytest.raises(ModelLoadError, match=r"guardmerge\.json: .*add up to 4 labels but the model "
                                             r"has num_labels=5"):
        inspect_bundle(b)


def test_manifest_duplicate_labels(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    _edit_manifest(b, lambda m: m["heads"][1].__setitem__("labels", ["normal", "normal", "hateful"]))
    with pytest.raises(ModelLoadError, match=r"guardmerge\.json: .*duplicate label names \['normal'\]"):
        inspect_bundle(b)


def test_manifest_must_match_config(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    _edit_manifest(b, lambda m: m["heads"][0].__setitem__("labels", ["safe", "jailbreak"]))
    with pytest.raises(ModelLoadError, match=r"heads do not match config\.json id2label"):
        inspect_bundle(b)


def test_config_duplicate_labels(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "guardmerge.json").unlink()
    cfg = json.loads((b / "config.json").read_text())
    cfg["id2label"]["1"] = cfg["id2label"]["0"]
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: duplicate label names"):
        inspect_bundle(b)


def test_weights_must_match_num_labels(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    cfg = json.loads((b / "config.json").read_text())
    cfg["id2label"]["5"] = "toxicity:extra"
    (b / "config.json").write_text(json.dumps(cfg))
    _edit_manifest(b, lambda m: m["heads"][1]["labels"].append("extra"))
    with pytest.raises(ModelLoadError, match=r"'classifier\.weight' has 5 rows but config\.json "
                                             r"declares 6 labels"):
        inspect_bundle(b)


def test_missing_tokenizer(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    for name in ("tokenizer.json", "vocab.txt"):
        (b / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        inspect_bundle(b)


def test_remote_code_is_refused(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    cfg = json.loads((b / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model"}
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="never runs remote code"):
        inspect_bundle(b)


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not a local folder, and fetching it from the "
                                             "Hugging Face Hub failed"):
        inspect_bundle("no-such-org/no-such-guard-model")


def test_missing_local_path():
    with pytest.raises(ModelLoadError, match="no such model folder"):
        inspect_bundle("./definitely/not/here")


def test_plain_single_head_classifier_loads_as_one_head(tmp_path, tokenizer):
    folder = build_classifier_folder(tmp_path / "toxic-bert", ["non_toxic", "toxic"],
                                     tokenizer=tokenizer, seed=5)
    assert not (folder / "guardmerge.json").exists()
    clf = BundleClassifier.from_pretrained(folder)
    assert [(h.name, h.labels) for h in clf.heads] == [("toxic-bert", ("non_toxic", "toxic"))]
    result = clf.classify(["hello world"])[0]
    assert sum(result.heads["toxic-bert"].scores.values()) == pytest.approx(1.0, abs=1e-5)
