"""The ``guardmerge`` command: a thin shell over the library. ``main(argv) -> exit code``.

Exit codes: 0 pass, 3 flag, 4 block (``scan``); 2 usage or configuration error (``serve``: a bad
config file, flag, bundle or policy, before anything binds); 1 other error.
Flags of ``scan`` / ``eval`` (runtime), ``merge`` and ``search`` come from the library's options
dataclasses (``RuntimeOptions``, ``MergeOptions``, ``SearchOptions``), so the command line and
the Python API take the same options with the same defaults. Every command imports what it
needs when it runs: ``--help`` and ``policy check`` never load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ._options import add_options, from_args
from .classifier import RuntimeOptions
from .exceptions import ConfigError, GuardmergeError, ModelLoadError
from .merge.options import DistillOptions, MergeOptions, SearchOptions

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FLAG = 3
EXIT_BLOCK = 4

logger = logging.getLogger("guardmerge.cli")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="guardmerge", description="Merged multi-head guard models for LLM chats.")
    p.add_argument("--version", action="version", version=f"guardmerge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("scan", help="check a text with a bundle and a policy")
    s.add_argument("text", nargs="?", default="-",
                   help="the text, '-' for standard input (default), or @FILE")
    s.add_argument("--bundle", required=True, help="guard bundle folder or Hub id")
    s.add_argument("--policy", required=True, help="policy YAML file")
    s.add_argument("--direction", choices=("input", "output"), default="input")
    s.add_argument("--role", default=None, help="message role (default: user / assistant)")
    s.add_argument("--json", action="store_true", help="print the verdict as JSON")
    s.add_argument("--scores", action="store_true", help="also print every head's scores")
    add_options(s, RuntimeOptions)

    i = sub.add_parser("inspect", help="show a bundle's heads, labels, recipe and sizes")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")

    pol = sub.add_parser("policy", help="policy tools")
    pol_sub = pol.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    pc = pol_sub.add_parser("check", help="validate policy files")
    pc.add_argument("files", nargs="+")
    pc.add_argument("--bundle", help="also check heads and labels against this bundle")

    m = sub.add_parser("merge", help="HM3-merge classifiers into a guard bundle")
    m.add_argument("recipe", help="merge recipe YAML")
    m.add_argument("-o", "--output", help="bundle folder to write (required unless --dry-run)")
    m.add_argument("--dry-run", action="store_true", help="check the sources and print how much "
                   "their task vectors interfere (norms, layer shares, cosines, sign conflicts, "
                   "warnings); write nothing")
    add_options(m, MergeOptions)

    d = sub.add_parser("distill", help="train a merged bundle to match every source model on "
                       "texts (multi-teacher distillation; optionally also their labels)")
    d.add_argument("bundle", help="merged bundle (its manifest names the sources)")
    d.add_argument("--texts", nargs="+", required=True, metavar="FILE",
                   help="texts: JSONL (text, optional head; a label too for "
                   "--label-weight), CSV or plain lines")
    d.add_argument("-o", "--output", required=True, help="bundle folder to write")
    d.add_argument("--source", action="append", default=[], metavar="HEAD=DIR",
                   help="teacher of HEAD instead of the manifest's source (repeatable)")
    add_options(d, DistillOptions)

    e = sub.add_parser("eval", help="per-head accuracy / macro-F1 / confusion on labelled data")
    e.add_argument("model", help="bundle or single-head classifier folder (or Hub id)")
    e.add_argument("data", nargs="+", help="JSONL or CSV files with text, head, label")
    e.add_argument("--source", action="append", default=[], metavar="HEAD=DIR",
                   help="also evaluate this source model on HEAD (repeatable): the original column")
    e.add_argument("--as-head", default=None,
                   help="for a single-head model: the head name its data uses")
    e.add_argument("--labels", default=None,
                   help="for a single-head model: comma-separated names for its labels")
    e.add_argument("--skip-bad", action="store_true", help="skip bad rows (each is reported)")
    e.add_argument("--json", action="store_true")
    add_options(e, RuntimeOptions)

    se = sub.add_parser("search", help="Beta-sampled density search over merges")
    se.add_argument("recipe")
    se.add_argument("--eval", dest="eval_data", nargs="+", required=True, help="labelled data files")
    se.add_argument("-o", "--out", required=True, help="folder for trials.jsonl, best bundle, report")
    add_options(se, SearchOptions)

    bg = sub.add_parser("build-guards", help="fine-tune real guard heads from packaged data and "
                        "merge them (offline; cached)")
    bg.add_argument("-o", "--out", default=".guardmerge-cache/guards")
    bg.add_argument("--quick", action="store_true", help="a fraction of the data (smoke run)")
    bg.add_argument("--rebuild", action="store_true", help="delete the cached guards first")

    b = sub.add_parser("bench", help="benchmarks (not tests): runtime, heads, merge, middleware, "
                       "search")
    b_sub = b.add_subparsers(dest="bench_command", metavar="WHICH", parser_class=_Parser)
    br = b_sub.add_parser("runtime", help="window latency / throughput, fp32 vs bf16")
    br.add_argument("--layers", type=int, default=12)
    br.add_argument("--hidden", type=int, default=768)
    br.add_argument("--heads", type=int, default=12)
    br.add_argument("--intermediate", type=int, default=3072)
    br.add_argument("--repeats", type=int, default=5)
    br.add_argument("--long-tokens", type=int, default=20000)
    br.add_argument("--dtypes", default="float32,bfloat16")
    br.add_argument("--threads", type=int, default=None)
    bh = b_sub.add_parser("heads", help="encoder pass vs per-head cost, 1 head vs 3 heads with "
                          "their own head modules")
    bh.add_argument("--family", default="deberta-v2")
    bh.add_argument("--layers", type=int, default=12)
    bh.add_argument("--hidden", type=int, default=768)
    bh.add_argument("--attention-heads", type=int, default=12)
    bh.add_argument("--intermediate", type=int, default=3072)
    bh.add_argument("--tokens", type=int, default=128)
    bh.add_argument("--batch", type=int, default=8)
    bh.add_argument("--repeats", type=int, default=5)
    bh.add_argument("--dtype", default="float32")
    bw = b_sub.add_parser("middleware", help="guard wrapper overhead per call; history cache")
    bw.add_argument("--calls", type=int, default=2000)
    bw.add_argument("--turns", type=int, default=20)
    bs = b_sub.add_parser("search", help="trials per hour of the density search, fp32 vs bf16")
    bs.add_argument("--texts", type=int, default=1000)
    bs.add_argument("--words", type=int, default=40)
    bs.add_argument("--trials", type=int, default=3)
    bs.add_argument("--workdir", default=None)
    bs.add_argument("--screen", type=int, default=100,
                    help="also time screened trials on this many texts (0: skip)")
    bs.add_argument("--search-trials", type=int, default=500,
                    help="the search size the time column projects")
    bm = b_sub.add_parser("merge", help="merge wall time and peak RSS, optionally vs mergekit")
    bm.add_argument("--layers", type=int, default=12)
    bm.add_argument("--hidden", type=int, default=768)
    bm.add_argument("--methods", default="ties,dare_ties")
    bm.add_argument("--mergekit", default=None,
                    help="path to a mergekit-yaml executable (in its own venv) to compare with")
    bm.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: temp)")
    bm.add_argument("--repeat", type=int, default=3,
                    help="runs per tool and method, alternating; medians are reported")
    bc = b_sub.add_parser("cli", help="start-up time of --help and policy check (fresh processes)")
    bc.add_argument("--repeats", type=int, default=10)
    bv = b_sub.add_parser("serve", help="the proxy: latency added, throughput, batching on vs "
                          "off, at concurrency 1 / 8 / 64 (in-process upstream)")
    bv.add_argument("--bundle", default=None,
                    help="bundle to serve (default: a BERT-base-sized random bundle; "
                    "'trivial': a model-free classifier, to see what the proxy itself costs)")
    bv.add_argument("--layers", type=int, default=12)
    bv.add_argument("--hidden", type=int, default=768)
    bv.add_argument("--dtype", default="float32")
    bv.add_argument("--concurrency", default="1,8,64")
    bv.add_argument("--requests", type=int, default=0,
                    help="requests per cell (default: max(24, 4 x concurrency))")
    bv.add_argument("--latency-ms", type=float, default=50.0,
                    help="the fake upstream's fixed latency")
    bv.add_argument("--words", type=int, default=24, help="words per prompt")
    bv.add_argument("--gap-ms", type=float, default=0.0,
                    help="pause between the fake upstream's streamed chunks, as a model "
                         "generating tokens pauses (default 0: all chunks at once)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible guard proxy (the [server] extra)",
                        description="Serve an OpenAI-compatible proxy that guards every call "
                        "with one bundle and policy. Flags override the --config file; the "
                        "proxy's own keys come from $GUARDMERGE_API_KEYS and the key sent "
                        "upstream from $GUARDMERGE_UPSTREAM_API_KEY (names set in the file).")
    sv.add_argument("--config", default=None, metavar="FILE", help="serve YAML file")
    if _ServeOptions is not None:
        add_options(sv, _ServeOptions)
        sv.set_defaults(**{f.name: _UNSET for f in dataclasses.fields(_ServeOptions)
                           if f.metadata.get("cli")})
    return p


try:  # the serve flags come from its options; without the [server] extra there are none
    from .serve.config import ServeOptions as _ServeOptions
except ImportError:  # pragma: no cover - depends on the installed extras
    _ServeOptions = None  # type: ignore[assignment,misc]
_UNSET = object()


def _read_text(arg: str) -> str:
    """The text to scan: the argument, standard input (``-``) or a file (``@FILE``), read as
    UTF-8. Bytes that are not UTF-8 are a usage error naming the source and the offset: a
    replacement character would scan a different text than the one the LLM gets."""
    if arg == "-":
        if getattr(sys.stdin, "buffer", None) is None:  # already text (an embedding app's stdin)
            return sys.stdin.read()
        data, source = sys.stdin.buffer.read(), "standard input"
    elif arg.startswith("@"):
        path = Path(arg[1:])
        try:
            data, source = path.read_bytes(), str(path)
        except OSError as exc:
            raise _UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    else:
        return arg
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UsageError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); scan reads UTF-8 only") from None


def _quiet_transformers(verbose: bool) -> None:
    """The CLI is an application: it silences transformers' weight-loading bars and load
    reports (unless -v); guardmerge's own progress bars and errors still show."""
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _cmd_scan(args: argparse.Namespace) -> int:
    from .classifier import BundleClassifier
    from .guard import Guard
    from .policy import Policy

    text = _read_text(args.text)
    policy = Policy.load(args.policy)
    _quiet_transformers(args.verbose)
    clf = BundleClassifier.from_pretrained(args.bundle, options=from_args(RuntimeOptions, args))
    guard = Guard(clf, policy, include_scores=args.scores or args.json)
    verdict = guard.check_text(text, direction=args.direction, role=args.role)
    if args.json:
        print(verdict.to_json(indent=2))
    else:
        print(f"{verdict.action.value.upper()}  ({args.direction}, policy {policy.name})")
        for f in verdict.findings:
            line = f"  {f.describe()}"
            if f.span:
                snippet = text[f.span[0]:f.span[1]].replace("\n", " ")
                if len(snippet) > 70:
                    snippet = snippet[:33] + " ... " + snippet[-32:]
                line += f'  "{snippet}"'
            print(line)
        if args.scores and verdict.scores:
            for head, labels in verdict.scores[0].items():
                print(f"  {head}: " + ", ".join(f"{k}={v:.3f}" for k, v in labels.items()))
    return {"pass": EXIT_OK, "flag": EXIT_FLAG, "block": EXIT_BLOCK}[verdict.action.value]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import inspect_bundle

    info = inspect_bundle(args.bundle)
    data: dict[str, Any] = {
        "path": str(info.path),
        "model_type": info.config.get("model_type"),
        "num_labels": info.num_labels,
        "parameters": info.num_parameters,
        "weight_bytes": info.weight_bytes,
        "dtypes": info.weight_dtypes,
        "layers": info.config.get("num_hidden_layers", info.config.get("n_layers")),
        "hidden_size": info.config.get("hidden_size", info.config.get("dim")),
        "manifest": info.manifest is not None,
        "layout": info.layout,
        "plain_transformers": info.plain_transformers,
        "family": None if info.family is None else {
            "name": info.family.name, "encoder": info.family.encoder,
            "reads": info.family.reads, "head_modules": list(info.family.head_modules),
            "output": info.family.output},
        "heads": [h.to_dict() for h in info.heads],
        "recipe": info.recipe,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"bundle     {data['path']}")
    print(f"model      {data['model_type']}, {data['layers']} layers, hidden {data['hidden_size']}, "
          f"{data['parameters'] / 1e6:.2f}M parameters, {data['weight_bytes'] / 2**20:.1f} MiB "
          f"({', '.join(data['dtypes'])})")
    fam = info.family
    if fam is None:
        print("family     unknown to guardmerge: it runs as transformers runs it, but cannot "
              "be merged")
    else:
        modules = f"head modules {', '.join(fam.head_modules)} (per head, never merged)" \
            if fam.head_modules else "no head modules"
        print(f"family     {fam.name}, reads {fam.describe_reads(info.config)}; {modules}; "
              f"output layer {fam.output}")
    if info.plain_transformers:
        print("layout     plain: AutoModelForSequenceClassification loads it (the concatenated "
              "logits; per-head softmax / sigmoid is guardmerge's)")
    else:
        print("layout     per_head: plain transformers cannot load it (each head has its own "
              "head modules, in guardmerge.safetensors); load it with guardmerge")
    if not info.manifest:
        print("manifest   none (a plain single-head classifier)")
    print(f"heads      {len(info.heads)} heads, {info.num_labels} labels")
    for h in info.heads:
        src = f"  <- {h.source}" if h.source else ""
        rev = f"@{h.revision[:12]}" if h.revision else ""
        mods = f" modules {h.modules}*" if h.modules else ""
        kind = " (multi_label: a sigmoid per label)" if h.multi_label else ""
        print(f"  {h.name:<16} [{h.offset}:{h.stop}] {', '.join(h.labels)}{kind}{mods}"
              f"{src}{rev}")
    recipe = info.recipe
    if recipe:
        print(f"recipe     method={recipe.get('method')} seed={recipe.get('seed')} "
              f"head_mode={recipe.get('head_mode')} dtype={recipe.get('dtype')}")
        for m in recipe.get("models", []):
            print(f"  {m.get('head', '?'):<16} weight={m.get('weight')} density={m.get('density')} "
                  f"<- {m.get('model')}")
    return EXIT_OK


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from .bundle import inspect_bundle
    from .policy import Policy

    heads = inspect_bundle(args.bundle).heads if args.bundle else None
    failed = 0
    for f in args.files:
        try:
            pol = Policy.load(f, heads=heads)
        except ConfigError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
            continue
        n_rules = len(pol.input.rules) + len(pol.output.rules)
        print(f"{f}: ok ({pol.name}: {len(pol.input.rules)} input, {len(pol.output.rules)} output "
              f"rules{', checked against ' + args.bundle if args.bundle else ''})"
              if n_rules else f"{f}: ok")
    return EXIT_USAGE if failed else EXIT_OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge, mergeability

    if args.dry_run:
        print(mergeability(args.recipe).render())
        return EXIT_OK
    if not args.output:
        raise _UsageError("guardmerge merge: -o/--output is required (or --dry-run)")
    _quiet_transformers(args.verbose)
    out = merge(args.recipe, args.output, from_args(MergeOptions, args))
    print(f"wrote {out}")
    return EXIT_OK


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise _UsageError(f"{flag} {item!r}: expected HEAD=DIR")
        out[key] = value
    return out


def _cmd_distill(args: argparse.Namespace) -> int:
    from .merge import distill

    _quiet_transformers(args.verbose)
    out = distill(args.bundle, args.texts, args.output, from_args(DistillOptions, args),
                  sources=_pairs(args.source, "--source"))
    print(f"wrote {out}")
    return EXIT_OK


def _single_head_view(clf: Any, as_head: str | None, labels: str | None) -> dict[str, str]:
    if as_head is None and labels is None:
        return {}
    if len(clf.heads) != 1:
        raise _UsageError("--as-head / --labels only apply to a single-head model")
    if labels:
        try:
            clf.relabel([x.strip() for x in labels.split(",")])
        except ConfigError as exc:
            raise _UsageError(f"--labels: {exc}") from exc
    return {clf.heads[0].name: as_head} if as_head else {}


def _cmd_eval(args: argparse.Namespace) -> int:
    from .classifier import BundleClassifier
    from .merge import collapse_warnings, comparison_table, evaluate, load_examples, render_comparison

    _quiet_transformers(args.verbose)
    runtime = from_args(RuntimeOptions, args)
    clf = BundleClassifier.from_pretrained(args.model, options=runtime)
    rename = _single_head_view(clf, args.as_head, args.labels)
    heads = [h if h.name not in rename else replace(h, name=rename[h.name]) for h in clf.heads]
    examples = load_examples(args.data, heads=heads, skip_bad=args.skip_bad)
    merged = evaluate(clf, examples, model=args.model, rename=rename)
    originals = {}
    for item in args.source:
        head, sep, folder = item.partition("=")
        if not sep:
            raise _UsageError(f"--source {item!r}: expected HEAD=DIR")
        src = BundleClassifier.from_pretrained(folder, options=runtime)
        if len(src.heads) == 1 and head in merged.heads:
            try:
                src.relabel(merged.heads[head].labels)
            except ConfigError as exc:
                raise _UsageError(f"--source {item}: {exc}") from exc
            originals[head] = evaluate(src, examples, model=folder, rename={src.heads[0].name: head})
        else:
            originals[head] = evaluate(src, examples, model=folder)
    rows = comparison_table(merged, originals)
    warnings = collapse_warnings(merged, originals)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": merged.to_dict(), "sources": {k: v.to_dict() for k, v in
                                                                originals.items()},
                          "comparison": rows, "warnings": warnings}, indent=2))
    else:
        print(merged.render())
        if originals:
            for head, rep in originals.items():
                print(rep.render())
        print()
        print(render_comparison(rows))
    return EXIT_OK


def _cmd_search(args: argparse.Namespace) -> int:
    from .merge import run_search

    _quiet_transformers(args.verbose)
    summary = run_search(args.recipe, args.eval_data, args.out, from_args(SearchOptions, args))
    best = summary["best"]
    if "screen" in summary:
        sc = summary["screen"]
        print(f"screened {summary['trials']} trials on {sc['examples']} of {sc['of']} examples; "
              f"finalists on all: {', '.join(map(str, sc['finalists']))}")
    print(f"best trial {best['trial']}: score {best['score']:.4f}, densities "
          f"{', '.join(f'{d:.3f}' for d in best['densities'])}")
    for k in ("results", "best_bundle", "report"):
        if k in summary:
            print(f"{k.replace('_', ' ')}: {summary[k]}")
    return EXIT_OK


def _cmd_build_guards(args: argparse.Namespace) -> int:
    from .tools.build import demo_guards

    _quiet_transformers(args.verbose)
    summary = demo_guards(args.out, quick=args.quick, rebuild=args.rebuild)
    print(f"bundle: {summary['bundle']} ({summary['chosen']})")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from .tools import bench as _bench

    if args.bench_command == "cli":  # fresh processes; no transformers logging to quiet
        _bench.cli(repeats=args.repeats)
        return EXIT_OK
    _quiet_transformers(args.verbose)
    if args.bench_command == "runtime":
        _bench.runtime(layers=args.layers, hidden=args.hidden, heads=args.heads,
                       intermediate=args.intermediate, repeats=args.repeats,
                       long_tokens=args.long_tokens, dtypes=args.dtypes.split(","),
                       threads=args.threads)
        return EXIT_OK
    if args.bench_command == "heads":
        _bench.heads(family=args.family, layers=args.layers, hidden=args.hidden,
                     attention_heads=args.attention_heads, intermediate=args.intermediate,
                     tokens=args.tokens, batch=args.batch, repeats=args.repeats,
                     dtype=args.dtype)
        return EXIT_OK
    if args.bench_command == "middleware":
        _bench.middleware(calls=args.calls, turns=args.turns)
        return EXIT_OK
    if args.bench_command == "search":
        _bench.search(texts=args.texts, words=args.words, trials=args.trials, workdir=args.workdir,
                      screen=args.screen, search_trials=args.search_trials)
        return EXIT_OK
    if args.bench_command == "serve":
        _bench.serve(bundle=args.bundle, layers=args.layers, hidden=args.hidden,
                     dtype=args.dtype, concurrency=[int(c) for c in args.concurrency.split(",")],
                     requests=args.requests, latency_ms=args.latency_ms, words=args.words,
                     gap_ms=args.gap_ms)
        return EXIT_OK
    if args.bench_command == "merge":
        _bench.merge(layers=args.layers, hidden=args.hidden, methods=args.methods.split(","),
                     mergekit=args.mergekit, workdir=args.workdir, repeat=args.repeat)
        return EXIT_OK
    raise _UsageError("guardmerge bench: choose runtime, heads, merge, middleware, search, "
                      "serve or cli")


def _cmd_serve(args: argparse.Namespace) -> int:
    if _ServeOptions is None:
        raise _UsageError("guardmerge serve needs the [server] extra: pip install "
                          "'guardmerge[server]'")
    from .serve.config import load_config, merge_flags
    from .serve.runner import run

    options = load_config(args.config) if args.config else _ServeOptions()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(_ServeOptions)
             if f.metadata.get("cli") and getattr(args, f.name, _UNSET) is not _UNSET}
    options = merge_flags(options, given, source=args.config)
    options.require("upstream", "bundle", "policy")
    _quiet_transformers(args.verbose)
    run(options)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"scan": _cmd_scan, "inspect": _cmd_inspect, "merge": _cmd_merge,
                "distill": _cmd_distill,
                "bench": _cmd_bench, "eval": _cmd_eval, "search": _cmd_search,
                "build-guards": _cmd_build_guards, "serve": _cmd_serve}
    try:
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "policy":
            if args.policy_command != "check":
                raise _UsageError("guardmerge policy: choose an action (check)")
            return _cmd_policy_check(args)
        return handlers[args.command](args)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, ModelLoadError) as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"guardmerge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GuardmergeError as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"guardmerge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("guardmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"guardmerge: error: {type(exc).__name__}: {exc} (run with -v for details)",
              file=sys.stderr)
        return EXIT_ERROR
