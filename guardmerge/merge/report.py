"""Search / evaluation reports: a Markdown summary with PNG plots (matplotlib is the optional
``[plot]`` extra; without it the summary is still written, with the numbers and a note)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..labels import head_name_from_id
from .evaluation import EvalReport, HeadReport, comparison_table, render_comparison

__all__ = ["write_search_report", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plots(out: Path, results: Sequence[Any], best: Any, originals: Mapping[str, EvalReport],
           model_names: Sequence[str]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    heads = sorted(best.heads)
    # score vs density, per head (the paper's Figure 3); one colour per model's density.
    # With screening, every trial's screening score is a dot and the finalists' scores on all
    # examples are crosses.
    stages = [("screen", "o", "screening subset"), ("full", "x", "all examples")]
    present = {r.stage for r in results}
    fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 4), squeeze=False)
    for ax, head in zip(axes[0], heads):
        for m, name in enumerate(model_names):
            for stage, marker, what in stages:
                rs = [r for r in results if r.stage == stage and head in r.heads]
                if not rs:
                    continue
                label = f"density of {name}" + (f" ({what})" if len(present) > 1 else "")
                ax.scatter([r.densities[m] for r in rs], [r.heads[head] for r in rs], s=12,
                           alpha=0.7, marker=marker, label=label)
        if head in originals:
            ax.axhline(originals[head].heads[head].macro_f1, color="black", ls="--", lw=1,
                       label="original model")
        ax.set_xlabel("task-vector density")
        ax.set_ylabel(f"{head} macro-F1")
        ax.set_title(head)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "density_vs_f1.png", dpi=110)
    plt.close(fig)
    made.append(("Score vs density per head", "density_vs_f1.png"))
    # original vs merged bars
    fig, ax = plt.subplots(figsize=(1.8 * len(heads) + 2, 3.5))
    xs = range(len(heads))
    orig = [originals[h].heads[h].macro_f1 if h in originals else 0.0 for h in heads]
    ax.bar([x - 0.2 for x in xs], orig, width=0.4, label="original")
    ax.bar([x + 0.2 for x in xs], [best.heads[h] for h in heads], width=0.4, label="best merge")
    ax.set_xticks(list(xs), heads)
    ax.set_ylabel("macro-F1")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "f1_original_vs_merged.png", dpi=110)
    plt.close(fig)
    made.append(("Original vs merged macro-F1", "f1_original_vs_merged.png"))
    # confusion matrices of the best merge
    for head in heads:
        rep = best.report["heads"].get(head)
        if not rep or rep.get("kind") == "multi_label":  # 2x2 per label: in the numbers only
            continue
        fig, ax = plt.subplots(figsize=(1.2 * len(rep["labels"]) + 2, 1.2 * len(rep["labels"]) + 1.5))
        ax.imshow(rep["confusion"], cmap="Blues")
        for i, row in enumerate(rep["confusion"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks(range(len(rep["labels"])), rep["labels"], rotation=30)
        ax.set_yticks(range(len(rep["labels"])), rep["labels"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{head}: best merge")
        fig.tight_layout()
        name = f"confusion_{head}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((f"Confusion matrix, {head}", name))
    return made


def write_search_report(out: Path, recipe: Any, options: Any, results: Sequence[Any], best: Any,
                        originals: Mapping[str, EvalReport]) -> Path:
    model_names = [m.head or head_name_from_id(m.model) for m in recipe.models]
    merged = EvalReport(model="best merge")
    for head, rep in best.report.get("heads", {}).items():
        merged.heads[head] = HeadReport(**rep)
    final = [r for r in results if r.stage == "full"]
    screened = [r for r in results if r.stage == "screen"]
    lines = ["# guardmerge search report", "",
             f"- recipe: method `{recipe.method}`, head_mode `{recipe.head_mode.value}`, "
             f"{len(recipe.models)} model(s){' (self-merge)' if recipe.self_merge else ''}",
             f"- trials: {options.trials}, densities ~ Beta({options.beta[0]}, {options.beta[1]})"
             f"{', shared' if options.shared_density else ', per model'}; objective `{options.objective}`"]
    lines.append(f"- head mode `{recipe.head_mode.value}`: " + {
        "merge": "the HM3-padded head rows go through the merge method",
        "owner": "each head's rows copied from its source",
        "refit": (f"each head re-fitted to its source's outputs on {recipe.refit.texts} "
                  f"calibration texts (temperature {recipe.refit.temperature:g}, pull "
                  f"{recipe.refit.pull:g})")}[recipe.head_mode.value])
    cal = recipe.calibration
    if cal is not None:
        from .calibration import load_calibration

        texts = load_calibration(cal.texts, limit=cal.limit)
        lines.append(f"- calibration: {', '.join(f'`{t}`' for t in cal.texts)}: {texts.size} "
                     f"texts (sha256 {texts.sha256[:16]}), {cal.max_length} tokens per text, "
                     f"RegMean statistics on up to {cal.per_source} texts per source")
    varied = [f"method over {', '.join(options.methods)}" if options.methods else "",
              f"lambda ~ U{options.lambda_range}" if options.lambda_range else "",
              f"alpha ~ U{options.alpha_range}" if options.alpha_range else ""]
    if any(varied):
        lines.append(f"- varied per trial: {'; '.join(v for v in varied if v)}")
    if screened:
        lines.append(f"- screening: every trial scored on {options.screen} examples first; the "
                     f"{len(final)} best went on to every example (only those are ranked below)")
    lines += [f"- best: trial {best.trial}, score {best.score:.4f}, method `{best.method}`, "
              f"lambda {best.lam:g}, alpha {best.alpha:g}, densities "
              f"{', '.join(f'{d:.3f}' for d in best.densities)}, merge seed {best.seed}", "",
              "## Original vs best merge (macro-F1 per head)", "", "```",
              render_comparison(comparison_table(merged, originals)), "```", ""]
    top = sorted(final, key=lambda r: (-r.score, r.trial))[:10]
    lines += ["## Top trials", "", "| trial | score | method | lambda | alpha | densities | " +
              " | ".join(sorted(best.heads)) + " |", "|---|---|---|---|---|---|" +
              "---|" * len(best.heads)]
    for r in top:
        lines.append(f"| {r.trial} | {r.score:.4f} | {r.method} | {r.lam:g} | {r.alpha:g} | "
                     f"{', '.join(f'{d:.3f}' for d in r.densities)} | "
                     + " | ".join(f"{r.heads[h]:.4f}" for h in sorted(best.heads)) + " |")
    lines.append("")
    if have_matplotlib():
        for title, name in _plots(out, results, best, originals, model_names):
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    else:
        lines += ["_Plots skipped: install the plot extra (`pip install guardmerge[plot]`)._", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
