"""Guard integrity, 7 and 8: files read only from inside their folder, every bad field named;
Retry-After in any form; a scan file in the wrong encoding named.

Weights are read only from regular files inside the bundle folder: an index entry with ``..``
or an absolute path, a symlink out, a FIFO (which would hang a reader) are refused with a
``ModelLoadError`` naming the file. Every malformed manifest or safetensors header field is a
``ModelLoadError`` naming the file and the field. Policies, recipes and manifests are capped at
1 MiB, and a key given twice in one mapping is an error.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import sys

import httpx
import pytest
from conftest import JB_POLICY

from guardmerge import (ChatClient, ModelLoadError, Policy, PolicyError, RecipeError,
                        RetryPolicy, inspect_bundle)
from guardmerge.cli import main
from guardmerge.merge import MergeRecipe

MB = 1 << 20


def _copy(bundle, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(bundle, dst)
    return dst


def _shard(bundle, weight_map):
    (bundle / "model.safetensors").rename(bundle / "model-00001.safetensors")
    (bundle / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_index_inside_the_folder_loads(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    _shard(b, {"classifier.weight": "model-00001.safetensors"})
    assert inspect_bundle(b).weight_files == [b / "model-00001.safetensors"]


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "/etc/passwd",
                                   "sub/../../x.safetensors", "C:\\weights.safetensors", 7])
def test_index_entries_that_leave_the_folder_are_refused(random_bundle, tmp_path, entry):
    b = _copy(random_bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(b / "model.safetensors", outside / "model.safetensors")
    _shard(b, {"classifier.weight": entry})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json: "
                                             r"weight_map\['classifier\.weight'\]"):
        inspect_bundle(b)


def test_a_symlink_out_of_the_folder_is_refused(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (b / "model.safetensors").rename(outside)
    (b / "model.safetensors").symlink_to(outside)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: weights file resolves to .*"
                                             r"outside"):
        inspect_bundle(b)
    os.symlink(outside, b / "shard.safetensors")  # an index entry that is a symlink out
    (b / "model.safetensors").unlink()
    (b / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"classifier.weight": "shard.safetensors"}}))
    with pytest.raises(ModelLoadError, match="outside"):
        inspect_bundle(b)


def test_a_symlink_inside_the_folder_is_fine(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "model.safetensors").rename(b / "real.safetensors")
    (b / "model.safetensors").symlink_to("real.safetensors")
    assert inspect_bundle(b).num_labels == 5


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "guardmerge.json",
                                  "tokenizer.json"])
def test_a_fifo_is_refused_instead_of_hanging_the_loader(random_bundle, tmp_path, name):
    b = _copy(random_bundle, tmp_path)
    (b / name).unlink()
    os.mkfifo(b / name)
    with pytest.raises(ModelLoadError, match=rf"{name.replace('.', '[.]')}: .*is a FIFO, "
                                             "expected a regular file"):
        inspect_bundle(b)


def test_a_device_is_refused(random_bundle, tmp_path):
    b = _copy(random_bundle, tmp_path)
    (b / "model.safetensors").unlink()
    try:
        os.mknod(b / "model.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(ModelLoadError, match="is a character device, expected a regular file"):
        inspect_bundle(b)


def test_a_fifo_policy_is_refused(tmp_path):
    os.mkfifo(tmp_path / "p.yaml")
    with pytest.raises(PolicyError, match=r"p\.yaml: configuration file is a FIFO"):
        Policy.load(tmp_path / "p.yaml")


MANIFEST_FIELDS = {
    "heads[0]: expected a mapping": lambda m: m["heads"].__setitem__(0, 5),
    "heads[0].name: expected a non-empty string": lambda m: m["heads"][0].__setitem__("name", 7),
    "heads[0].labels: expected a non-empty list": lambda m: m["heads"][0].__setitem__("labels",
                                                                                      "benign"),
    "heads[0].labels[1]: expected a non-empty string": lambda m: m["heads"][0]["labels"]
    .__setitem__(1, {"x": 1}),
    "heads[0].offset: expected an integer": lambda m: m["heads"][0].__setitem__("offset", "abc"),
    "heads[1].offset: expected an integer": lambda m: m["heads"][1].__setitem__("offset", None),
    "heads[0].source: expected a mapping": lambda m: m["heads"][0].__setitem__("source", [1]),
    "heads[0].source.id: expected a non-empty string": lambda m: m["heads"][0].__setitem__(
        "source", {"id": 5}),
    "heads: expected a non-empty list": lambda m: m.__setitem__("heads", {"a": 1}),
    "format_version is '1'": lambda m: m.__setitem__("format_version", "1"),
}


@pytest.mark.parametrize("field", list(MANIFEST_FIELDS))
def test_every_malformed_manifest_field_is_named(random_bundle, tmp_path, field):
    b = _copy(random_bundle, tmp_path)
    manifest = json.loads((b / "guardmerge.json").read_text())
    MANIFEST_FIELDS[field](manifest)
    (b / "guardmerge.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as err:
        inspect_bundle(b)
    assert "guardmerge.json" in str(err.value) and field in str(err.value)


def _safetensors(path, header, data=b"\0" * 8):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


HEADER_FIELDS = {
    "dtype: unknown dtype ['F32']": {"t": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
    "dtype: unknown dtype 'F99'": {"t": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
    "shape: expected a list of non-negative integers": {
        "t": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}},
    "shape: expected a list of non-negative integers, got [-2]": {
        "t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    "shape: expected a list of non-negative integers, got [True": {
        "t": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
    "data_offsets: expected [start, end]": {"t": {"dtype": "F32", "shape": [2],
                                                  "data_offsets": "ab"}},
    "data_offsets: expected [start, end] with 0 <= start <= end, got [8, 0]": {
        "t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
    "malformed header entry (no 'shape')": {"t": {"dtype": "F32", "data_offsets": [0, 8]}},
    "malformed header entry (expected a mapping)": {"t": [1, 2]},
    "__metadata__: expected a mapping of strings to strings": {"__metadata__": ["x"]},
    "data_offsets overlap": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
def test_every_malformed_safetensors_header_field_is_named(tmp_path, field):
    from guardmerge._safetensors import read_header

    path = tmp_path / "w.safetensors"
    _safetensors(path, HEADER_FIELDS[field])
    with pytest.raises(ModelLoadError) as err:
        read_header(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_size_caps_on_policies_recipes_and_manifests(random_bundle, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(JB_POLICY + "#" * MB)
    size = f"{len(JB_POLICY) + MB:,}"
    with pytest.raises(PolicyError, match=rf"big\.yaml: configuration file is {size} bytes, "
                                          r"over the limit of 1,048,576"):
        Policy.load(big)
    with pytest.raises(RecipeError, match="over the limit"):
        MergeRecipe.load(big)
    with pytest.raises(PolicyError, match="over the limit"):
        Policy.from_yaml(JB_POLICY + "#" * MB)
    b = _copy(random_bundle, tmp_path)
    (b / "guardmerge.json").write_text((b / "guardmerge.json").read_text() + " " * MB)
    with pytest.raises(ModelLoadError, match=r"guardmerge\.json: .*over the limit"):
        inspect_bundle(b)


def test_duplicate_keys_are_errors(random_bundle, tmp_path):
    rule = "input:\n  rules:\n    - head: jailbreak\n      labels: [jailbreak]\n"
    with pytest.raises(PolicyError, match=r"line 6, column 7\): duplicate key 'block' \(first "
                                          r"given on line 5\)"):
        Policy.from_yaml(rule + "      block: 0.9\n      block: 0.1\n")
    with pytest.raises(PolicyError, match="duplicate key 'on_error'"):
        Policy.from_yaml("on_error: block\non_error: pass\n" + JB_POLICY)
    with pytest.raises(RecipeError, match="duplicate key 'method'"):
        MergeRecipe.from_yaml("base: x\nmethod: ties\nmethod: linear\nmodels: [{model: y}]\n")
    b = _copy(random_bundle, tmp_path)
    text = (b / "guardmerge.json").read_text()
    (b / "guardmerge.json").write_text(text.replace('"format_version": 2',
                                                    '"format_version": 2, "format_version": 2'))
    with pytest.raises(ModelLoadError, match=r"guardmerge\.json: not valid JSON \(duplicate key "
                                             "'format_version'"):
        inspect_bundle(b)
    # a YAML merge key may still be overridden by the mapping it is merged into
    p = Policy.from_yaml("input:\n  rules:\n    - &r {head: jailbreak, labels: [jailbreak], "
                         "block: 0.9}\n    - {<<: *r, id: second, block: 0.5}\n")
    assert [r.block for r in p.input.rules] == [0.9, 0.5]


# -- 8: Retry-After and the scan file ------------------------------------------------------------


def _retrying(headers: dict[str, str]):
    responses = [httpx.Response(503, headers=headers), httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "ok"}}]})]
    sleeps: list[float] = []
    client = ChatClient("http://upstream.invalid/v1", transport=httpx.MockTransport(
        lambda request: responses.pop(0)), retry=RetryPolicy(
        sleep=sleeps.append, max_attempts=3, max_retry_time=5.0, backoff_initial=0.01,
        backoff_max=0.05, jitter=0.0))
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    return reply, sleeps


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf", "1e12", "99999999999999999999",
                                   "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 99 Foo 2020", "",
                                   "0x10", "1; foo"])
def test_garbage_and_huge_retry_after_fall_back_to_the_backoff(value):
    reply, sleeps = _retrying({"Retry-After": value})
    assert reply["choices"][0]["message"]["content"] == "ok"
    assert sleeps == [0.01]  # the first backoff step, never the header's value


@pytest.mark.parametrize("headers,wait", [({"Retry-After": "2"}, 2.0),
                                          ({"Retry-After": " 0.5 "}, 0.5),
                                          ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
                                          ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 -0000"}, 0.0),
                                          ({"retry-after-ms": "nan", "Retry-After": "1"}, 1.0),
                                          ({"retry-after-ms": "250"}, 0.25)])
def test_readable_retry_after_values_are_honoured(headers, wait):
    _, sleeps = _retrying(headers)
    assert sleeps == [wait]


def test_scan_names_a_file_that_is_not_utf8(trigger_bundle, tmp_path, capsys, monkeypatch):
    policy = tmp_path / "p.yaml"
    policy.write_text("input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n")
    bad = tmp_path / "prompt.txt"
    bad.write_bytes("caf\u00e9 ".encode("latin-1") + b"xyzzy")
    args = ["scan", "--bundle", str(trigger_bundle), "--policy", str(policy)]
    assert main([*args, f"@{bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not UTF-8 text (byte 0xe9 at offset 3)" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe xyzzy")))
    assert main([*args, "-"]) == 2
    assert "standard input: not UTF-8 text (byte 0xff at offset 0)" in capsys.readouterr().err
