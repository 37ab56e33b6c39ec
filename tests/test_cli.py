"""The guardmerge command: exit codes, output, one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import guardmerge
from guardmerge.cli import main
from guardmerge.testing import TRIGGER, random_text

POLICIES = Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture()
def policies(tmp_path):
    block = tmp_path / "block.yaml"
    block.write_text("input:\n  rules:\n    - {head: jailbreak, labels: [jailbreak], flag: 0.5, block: 0.9}\n")
    flag = tmp_path / "flag.yaml"
    flag.write_text("input:\n  rules:\n    - {head: jailbreak, labels: [jailbreak], flag: 0.5}\n"
                    "    - {head: topic, labels: [chat, code, travel], flag: 0.01}\n")
    return block, flag


def test_scan_exit_codes(trigger_bundle, policies, capsys):
    block, flag = policies
    assert main(["scan", "--bundle", str(trigger_bundle), "--policy", str(block), "hello world"]) == 0
    assert capsys.readouterr().out.startswith("PASS")
    assert main(["scan", "--bundle", str(trigger_bundle), "--policy", str(flag), "hello"]) == 3
    assert capsys.readouterr().out.startswith("FLAG")
    code = main(["scan", "--bundle", str(trigger_bundle), "--policy", str(block),
                 f"hello {TRIGGER} world"])
    out = capsys.readouterr().out
    assert code == 4 and out.startswith("BLOCK")
    assert "jailbreak:jailbreak" in out and "chars 0-17" in out


def test_scan_json_from_file_with_buried_trigger(trigger_bundle, policies, tmp_path, capsys):
    text = random_text(5500, seed=3, insert={5300: TRIGGER})
    f = tmp_path / "long.txt"
    f.write_text(text)
    code = main(["scan", "--bundle", str(trigger_bundle), "--policy", str(policies[0]), "--json",
                 f"@{f}"])
    data = json.loads(capsys.readouterr().out)
    assert code == 4 and data["action"] == "block"
    start, end = data["findings"][0]["span"]
    assert start <= text.index(TRIGGER) < end
    assert set(data["scores"][0]) == {"jailbreak", "topic"}


def test_scan_reads_stdin(trigger_bundle, policies, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"a {TRIGGER}"))
    assert main(["scan", "--bundle", str(trigger_bundle), "--policy", str(policies[0]), "-"]) == 4


def test_bad_policy_is_one_clear_error_without_traceback(trigger_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  rules:\n    - {head: jailbreak, labels: [nope], block: 2}\n")
    code = main(["scan", "--bundle", str(trigger_bundle), "--policy", str(bad), "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert f"{bad}: input.rules[0].block: expected a number in [0, 1], got 2" in err


def test_unknown_label_for_bundle_is_config_error(trigger_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  rules:\n    - {head: jailbreak, labels: [nope], block: 0.5}\n")
    assert main(["scan", "--bundle", str(trigger_bundle), "--policy", str(bad), "hi"]) == 2
    assert "head 'jailbreak' has no label 'nope'" in capsys.readouterr().err


def test_missing_bundle_and_usage_errors(tmp_path, capsys):
    assert main(["scan", "--bundle", str(tmp_path / "none"), "--policy",
                 str(POLICIES / "default.yaml"), "x"]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["scan", "x"]) == 2
    assert "--bundle" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["scan", "--bundle", ".", "--policy", str(POLICIES / "default.yaml"),
                 "@/no/such/file"]) == 2


def test_inspect(random_bundle, capsys):
    assert main(["inspect", str(random_bundle)]) == 0
    out = capsys.readouterr().out
    assert "jailbreak" in out and "[2:5] normal, offensive, hateful" in out
    assert main(["inspect", "--json", str(random_bundle)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_labels"] == 5 and data["heads"][1]["offset"] == 2
    import math

    from safetensors import safe_open

    with safe_open(str(random_bundle / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert data["parameters"] == numel
    assert data["weight_bytes"] == (random_bundle / "model.safetensors").stat().st_size


def test_policy_check(random_bundle, tmp_path, capsys):
    files = [str(POLICIES / n) for n in ("default.yaml", "strict.yaml", "monitor.yaml")]
    assert main(["policy", "check", *files, "--bundle", str(random_bundle)]) == 0
    assert capsys.readouterr().out.count(": ok") == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  rules:\n    - {head: spam, labels: [spam], block: 0.5}\n")
    assert main(["policy", "check", str(bad), "--bundle", str(random_bundle)]) == 2
    assert "unknown head 'spam'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "guardmerge", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"guardmerge {guardmerge.__version__}"


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int3"], "argument --dtype: unknown dtype 'int3'; use float32, bfloat16"),
    (["--threads", "0"], "threads: must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size: must be >= 1, got 0"),
    (["--overlap", "9999"], "overlap: must be in [0, 509] for windows of 510 tokens, got 9999"),
    (["--max-length", "9999"], "max_length: must be in [3, 512]"),
])
def test_bad_runtime_options_are_usage_errors_not_clamped(trigger_bundle, policies, capsys,
                                                          flags, message):
    code = main(["scan", "--bundle", str(trigger_bundle), "--policy", str(policies[0]), *flags,
                 "hello"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_option_errors_are_config_errors_and_value_errors(trigger_bundle):
    from guardmerge import BundleClassifier, ConfigError, RuntimeOptions

    with pytest.raises(ConfigError, match="overlap: must be in") as err:
        BundleClassifier.from_pretrained(trigger_bundle, overlap=9999)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="dtype: unknown dtype 'int3'"):
        RuntimeOptions(dtype="int3")
    short = BundleClassifier.from_pretrained(trigger_bundle, max_length=16)
    assert (short.window_tokens, short.overlap) == (14, 13)  # the default shrinks to fit
