"""Merge benchmark and mergekit comparison (``guardmerge bench merge``, examples/compare_mergekit.py).

Builds a random base encoder and two classifiers (2 and 3 labels) of the requested size locally,
plus their HM3-expanded copies (the zero-padded heads and the all-zero base head written out as
ordinary BertForSequenceClassification folders) so mergekit can merge exactly what we merge.
Each merge runs in its own process; wall time and peak RSS come from ``wait4``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["build_inputs", "compare_outputs", "measure", "run"]

LABELS = (["benign", "jailbreak"], ["hate speech", "normal", "offensive"])


def build_inputs(root: Path, *, layers: int, hidden: int, seed: int = 0,
                 noise: float = 0.01) -> dict[str, Path]:
    """base (BertModel names), jb + hate classifiers, and HM3-expanded copies for mergekit."""
    from safetensors.torch import load_file, save_file

    from ..merge.heads import expand_rows
    from ..testing import (bert_base_vocab, build_base_folder, build_classifier_folder,
                          build_tokenizer)

    if (root / "done.json").exists():
        return {k: Path(v) for k, v in json.loads((root / "done.json").read_text()).items()}
    root.mkdir(parents=True, exist_ok=True)
    vocab = bert_base_vocab() if hidden >= 256 else None
    tok = build_tokenizer(vocab, extra_words=()) if vocab else build_tokenizer()
    size = dict(hidden=hidden, layers=layers, attention_heads=max(1, hidden // 64),
                intermediate=4 * hidden)
    base, state = build_base_folder(root / "base", tokenizer=tok, seed=seed, **size)
    paths = {"base": base}
    for i, (name, labels) in enumerate(zip(("jb", "hate"), LABELS)):
        paths[name] = build_classifier_folder(root / name, labels, tokenizer=tok, seed=seed + 10 + i,
                                              base_state=state, noise=noise, **size)
    del state
    # HM3-expanded copies: same tensors, heads zero-padded to all 5 labels
    total = sum(len(x) for x in LABELS)
    offsets = {"jb": 0, "hate": len(LABELS[0])}
    for key in ("jb", "hate"):
        dst = root / f"{key}-expanded"
        shutil.copytree(paths[key], dst)
        sd = load_file(str(dst / "model.safetensors"))
        for t in ("classifier.weight", "classifier.bias"):
            sd[t] = expand_rows(sd[t], offsets[key], total).to(sd[t].dtype)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((dst / "config.json").read_text())
        cfg["id2label"] = {str(i): f"l{i}" for i in range(total)}
        cfg["label2id"] = {f"l{i}": i for i in range(total)}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        paths[f"{key}-expanded"] = dst
        del sd
    # expanded base: classifier names ("bert." prefix) and an all-zero head of the full size
    dst = root / "base-expanded"
    shutil.copytree(paths["jb-expanded"], dst)
    sd = {f"bert.{k}": v for k, v in load_file(str(base / "model.safetensors")).items()}
    hidden_size = sd["bert.pooler.dense.weight"].shape[0]
    sd["classifier.weight"] = torch.zeros(total, hidden_size)
    sd["classifier.bias"] = torch.zeros(total)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    paths["base-expanded"] = dst
    (root / "done.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def measure(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; return wall seconds and the peak RSS of that process (MiB), via wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n"
                           f"{out.decode(errors='replace')[-3000:]}")
    return {"seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def _ours_cmd(paths: dict[str, Path], method: str, density: float, out: Path, seed: int) -> list[str]:
    recipe = {"base": str(paths["base"]), "method": method, "seed": seed, "head_mode": "merge",
              "parameters": {"density": density},
              "models": [{"model": str(paths["jb"]), "head": "jailbreak"},
                         {"model": str(paths["hate"]), "head": "hate"}]}
    code = ("import json,sys; from guardmerge.merge import merge; "
            "merge(json.loads(sys.argv[1]), sys.argv[2], overwrite=True)")
    return [sys.executable, "-c", code, json.dumps(recipe), str(out)]


def _mergekit_cmd(mergekit: str, paths: dict[str, Path], method: str, density: float,
                  out: Path, seed: int) -> list[str]:
    params = {"weight": 1.0}
    if method != "linear":
        params["density"] = density
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(paths["jb-expanded"]), "parameters": dict(params)},
                         {"model": str(paths["hate-expanded"]), "parameters": dict(params)}]}
    if method != "linear":
        config["base_model"] = str(paths["base-expanded"])
    cfg_path = out.parent / f"mergekit-{method}.yaml"
    cfg_path.write_text(json.dumps(config))
    return [mergekit, str(cfg_path), str(out), "--quiet", "--random-seed", str(seed),
            "--no-copy-tokenizer", "--allow-crimes"]


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    a, b = _load_all(ours), _load_all(theirs)
    if set(a) != set(b):
        return {"equal_names": False, "only_ours": sorted(set(a) - set(b))[:5],
                "only_mergekit": sorted(set(b) - set(a))[:5]}
    worst, worst_name, differing, elements = 0.0, "", 0, 0
    for n in a:
        if not a[n].numel():
            continue
        diff = (a[n].float() - b[n].float()).abs()
        differing += int((diff > 0).sum())
        elements += diff.numel()
        d = diff.max().item()
        if d > worst:
            worst, worst_name = d, n
    return {"equal_names": True, "tensors": len(a), "max_abs_diff": worst,
            "worst_tensor": worst_name, "differing": differing, "elements": elements}


def run(*, layers: int = 12, hidden: int = 768, methods: Sequence[str] = ("ties", "dare_ties"),
        mergekit: str | None = None, workdir: str | None = None, density: float = 0.5,
        seed: int = 0, compare: Sequence[str] = ("ties", "linear"),
        repeat: int = 3) -> dict[str, Any]:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="guardmerge-merge-bench-"))
    results: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        paths = build_inputs(root / f"inputs-{layers}x{hidden}", layers=layers, hidden=hidden)
        size_mib = (paths["jb"] / "model.safetensors").stat().st_size / 2**20
        print(f"# guardmerge bench merge: BERT {layers} layers, hidden {hidden}, "
              f"{size_mib:.0f} MiB per model (fp32), 2 classifiers (2 + 3 labels) + base; "
              f"inputs ready in {time.perf_counter() - t:.1f}s")
        print(f"# each merge in its own process; peak RSS of that process; density {density}")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        floor = measure([sys.executable, "-c", "import guardmerge.merge"], env)
        print(f"# python start + import torch/guardmerge alone: {floor['seconds']:.1f}s, "
              f"{floor['peak_rss_mib']:.0f} MiB (inside every 'ours' figure)")
        print(f"{'method':<10} {'tool':<9} {'wall s':>8} {'peak RSS MiB':>13}   "
              f"(median of {repeat}; every run's wall s)")
        todo = list(dict.fromkeys(list(methods) + [m for m in compare if mergekit]))
        # Every measurement first, comparisons last: a child's ru_maxrss includes the RSS it
        # inherited from this process at fork, so this process must stay small while measuring.
        # The tools alternate run by run, so a noisy spell on this shared machine hits both.
        for method in todo:
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "mergekit": []}
            out_ours, out_mk = root / f"ours-{method}", root / f"mergekit-{method}"
            for _ in range(repeat):
                shutil.rmtree(out_ours, ignore_errors=True)  # neither tool moves an old output
                runs["ours"].append(measure(_ours_cmd(paths, method, density, out_ours, seed), env))
                if mergekit:
                    shutil.rmtree(out_mk, ignore_errors=True)
                    runs["mergekit"].append(measure(_mergekit_cmd(mergekit, paths, method, density,
                                                                  out_mk, seed), env))
            row: dict[str, Any] = {}
            for tool in ("ours", "mergekit"):
                if not runs[tool]:
                    continue
                row[tool] = {"seconds": statistics.median(r["seconds"] for r in runs[tool]),
                             "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs[tool]),
                             "runs_seconds": [r["seconds"] for r in runs[tool]]}
                every = " ".join(f"{x:.1f}" for x in row[tool]["runs_seconds"])
                print(f"{method:<10} {tool:<9} {row[tool]['seconds']:>8.1f} "
                      f"{row[tool]['peak_rss_mib']:>13.0f}   ({every})")
            if mergekit:
                ratio_t = row["ours"]["seconds"] / row["mergekit"]["seconds"]
                ratio_m = row["ours"]["peak_rss_mib"] / row["mergekit"]["peak_rss_mib"]
                row["time_ratio"], row["rss_ratio"] = ratio_t, ratio_m
                print(f"{method:<10} {'ratio':<9} {ratio_t:>8.2f} {ratio_m:>13.2f}   "
                      f"(ours / mergekit, medians)")
            results[method] = row
        for method in todo:
            if mergekit and method in compare:
                c = results[method]["compare"] = compare_outputs(root / f"ours-{method}",
                                                                  root / f"mergekit-{method}")
                if c.get("equal_names"):
                    print(f"{method:<10} {c['tensors']} tensors compared: max |ours - mergekit| = "
                          f"{c['max_abs_diff']:.3g}; {c['differing']} of {c['elements']:,} "
                          f"elements differ"
                          + (f" (worst in {c['worst_tensor']})" if c['differing'] else ""))
                else:
                    print(f"{method:<10} tensor NAMES differ: {c}")
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    return results
