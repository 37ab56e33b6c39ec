"""The proxy's configuration (file + key path errors, flags over the file, secrets from the
environment), the CLI's exit codes, and the batching seam in the classifier."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from guardmerge import BundleClassifier, ConfigError
from guardmerge.cli import main
from guardmerge.serve import ServeOptions, load_config
from guardmerge.testing import random_text

GOOD = """
version: 1
server: {host: 127.0.0.1, port: 9100, passthrough: ["GET /v1/files/{name}"]}
upstream: {base_url: "http://127.0.0.1:8001/v1", timeout: 30, api_key_env: MY_UPSTREAM_KEY}
guard: {bundle: bundles/g, policy: policies/p.yaml, dtype: bf16, cache_size: 0, timeout: 2}
batching: {enabled: false, max_windows: 16, max_tokens: 4096, max_wait_ms: 2, max_queue: 10}
auth: {keys_env: MY_PROXY_KEYS, forward_client_key: false}
"""


def test_a_good_file_maps_every_section(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(GOOD)
    opts = load_config(path)
    assert (opts.host, opts.port, opts.upstream) == ("127.0.0.1", 9100, "http://127.0.0.1:8001/v1")
    assert opts.bundle == str(tmp_path / "bundles/g")  # relative to the file
    assert opts.policy == str(tmp_path / "policies/p.yaml")
    assert (opts.dtype, opts.cache_size, opts.check_timeout) == ("bfloat16", 0, 2.0)
    assert (opts.batching, opts.max_batch_windows, opts.max_batch_tokens) == (False, 16, 4096)
    assert (opts.max_wait_ms, opts.max_queue, opts.upstream_timeout) == (2.0, 10, 30.0)
    assert opts.passthrough == ("GET /v1/files/{name}",)
    assert opts.proxy_keys({"MY_PROXY_KEYS": "a, b,,"}) == ("a", "b")
    assert opts.proxy_keys({}) == ()
    assert opts.upstream_key({"MY_UPSTREAM_KEY": " k "}) == "k"
    assert opts.forward_client_key is False
    assert ServeOptions().host == "127.0.0.1"  # the loopback interface by default


def test_every_problem_names_the_file_and_the_key_path(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("""
server: {port: "eighty", colour: blue}
upstream: {base_url: 42}
guard: {dtype: int3, timeout: -1}
batching: {max_windows: 0, max_wait_ms: .nan}
auth: {forward_client_key: "yes"}
extra: {}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for expected in ("server.port: expected an integer", "server.colour: unknown key",
                     "upstream.base_url: expected a non-empty string",
                     "guard.dtype: unknown dtype 'int3'", "guard.timeout: expected a number > 0",
                     "batching.max_windows: expected an integer >= 1",
                     "batching.max_wait_ms: expected a finite number",
                     "auth.forward_client_key: expected true or false", "extra: unknown key"):
        assert f"{path}: {expected}" in text, expected
    path.write_text("upstream: {base_url: 'ftp://x'}\nguard: {window_chars: 10, overlap_chars: 10}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: upstream.base_url: expected an http://" in str(err.value)
    assert f"{path}: guard.overlap_chars: need 0 <= overlap_chars" in str(err.value)
    path.write_text("server: {port: 1}\nserver: {port: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(path)


def test_the_cli_exits_2_on_config_errors_and_flags_override_the_file(tmp_path, capsys,
                                                                      monkeypatch):
    path = tmp_path / "serve.yaml"
    path.write_text("batching: {max_windows: 0}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert f"{path}: batching.max_windows" in capsys.readouterr().err
    assert main(["serve", "--port", "9000"]) == 2  # no upstream, bundle or policy
    err = capsys.readouterr().err
    assert "upstream: required" in err and "bundle: required" in err
    assert main(["serve", "--max-batch-windows", "0", "--upstream", "http://x/v1"]) == 2
    path.write_text(GOOD)
    seen = {}
    monkeypatch.setattr("guardmerge.serve.runner.run", lambda options: seen.update(o=options))
    assert main(["serve", "--config", str(path), "--port", "9200", "--no-batching",
                 "--max-queue", "3"]) == 0
    opts = seen["o"]
    assert (opts.port, opts.max_queue, opts.batching) == (9200, 3, False)  # flags win
    assert opts.max_batch_windows == 16 and opts.host == "127.0.0.1"      # the file's
    path.write_text(GOOD.replace("bundles/g", str(tmp_path / "missing")))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        "input: {rules: [{head: jailbreak, labels: [jailbreak], block: 0.9}]}\n")
    monkeypatch.undo()
    assert main(["serve", "--config", str(path)]) == 2  # a missing bundle: exit 2
    assert "missing" in capsys.readouterr().err


def test_pooled_batches_score_exactly_as_separate_calls(trigger_bundle):
    clf = BundleClassifier.from_pretrained(trigger_bundle, batch_size=64)
    texts = [[random_text(20, seed=1)], [random_text(900, seed=2, insert={700: "xyzzy"}),
                                         "short one"], [random_text(5, seed=3) + " xyzzy"]]
    alone = [clf.classify(t) for t in texts]
    passes = clf.stats.forward_passes
    pooled = clf.classify_batch([clf.prepare(t) for t in texts])
    assert clf.stats.forward_passes == passes + 1  # one forward pass for all three calls
    assert [len(p) for p in pooled] == [1, 2, 1]
    for a_call, p_call in zip(alone, pooled):
        for a, p in zip(a_call, p_call):
            assert [w.span for w in a.windows] == [w.span for w in p.windows]
            assert p.text_index == a.text_index
            for head in a.heads:
                for label, value in a.heads[head].scores.items():
                    assert p.heads[head].scores[label] == pytest.approx(value, abs=1e-5)
                assert p.heads[head].windows == a.heads[head].windows
    assert pooled[1][0].score("jailbreak", "jailbreak") > 0.9
    assert pooled[0][0].score("jailbreak", "jailbreak") < 0.1
    assert clf.classify_batch([]) == []


def test_cross_field_flag_and_environment_problems_name_where_the_value_came_from(tmp_path,
                                                                                capsys):
    from guardmerge.serve.config import merge_flags

    path = tmp_path / "serve.yaml"
    path.write_text("server: {port: 9100}\nbatching: {max_windows: 4}\n"
                    "guard: {window_chars: 100, overlap_chars: 50}\n")
    opts = load_config(path)
    with pytest.raises(ConfigError) as err:
        merge_flags(opts, {"max_batch_windows": -1}, source=str(path))
    assert str(err.value) == "--max-batch-windows: must be a positive integer, got -1"
    with pytest.raises(ConfigError) as err:  # from Python: the field's name
        ServeOptions(window_chars=10, overlap_chars=50)
    assert str(err.value).startswith("overlap_chars: need 0 <= overlap_chars < window_chars")
    assert main(["serve", "--config", str(path), "--max-batch-windows", "-1",
                 "--upstream", "http://x/v1"]) == 2
    assert "--max-batch-windows: must be a positive integer, got -1" in capsys.readouterr().err
    path.write_text("auth: {keys_env: 'NOT A NAME'}\nupstream: {api_key_env: OK_NAME}\n")
    with pytest.raises(ConfigError, match=rf"{path}: auth.keys_env: expected an environment "
                                          "variable name"):
        load_config(path)
    opts = ServeOptions(keys_env="MY_KEYS", upstream_key_env="MY_UP")
    with pytest.raises(ConfigError) as err:
        opts.proxy_keys({"MY_KEYS": "good-key,bad key\x01"})
    assert str(err.value).startswith("$MY_KEYS (auth.keys_env): key 2 ")
    assert "bad" not in str(err.value)  # never the value
    with pytest.raises(ConfigError, match=r"^\$MY_UP \(upstream.api_key_env\)"):
        opts.upstream_key({"MY_UP": "sk-\nInjected: header"})
