"""README's main command: a guarded chat over a real guard bundle, offline, end to end.

    python examples/demo.py [--rebuild] [--quick]

1. Builds (or reuses, from .guardmerge-cache/guards) three real guard heads fine-tuned from the
   packaged all-MiniLM-L6-v2 encoder on packaged labelled text (jailbreak, toxicity, sentiment),
   HM3-merges them (plain merges, head re-fit, RegMean + re-fit, all on unlabelled text; then
   two distillations of the best training-free one: on unlabelled text, and with the training
   split's labels as well), and keeps the one that does best on the validation split.
2. Starts a small OpenAI-compatible LLM stand-in on 127.0.0.1 (it echoes what it is asked).
3. Sends prompts through the real `openai` client wrapped by guardmerge, with
   policies/default.yaml, and prints pass / flag / block with the scores and the spans that
   caused them, including a long prompt with a jailbreak buried past token 512.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".guardmerge-cache" / "guards"


def llm_stand_in(messages):
    """Echo the request (so a harmful request to repeat text shows the output check)."""
    text = ""
    for m in reversed(messages):
        if m.get("role") == "user":
            text = m.get("content") if isinstance(m.get("content"), str) else ""
            break
    if text.lower().startswith("repeat after me:"):
        return text.split(":", 1)[1].strip()
    return f"Happy to help. You asked about: {text[:80]}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rebuild", action="store_true", help="delete the cached guards first")
    p.add_argument("--quick", action="store_true", help="a fraction of the data (smoke run)")
    args = p.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # an application may quiet transformers' load output
    hf_logging.set_verbosity_error()
    from guardmerge import Guard, PromptBlockedError, ResponseBlockedError, guard_client
    from guardmerge.testing import OpenAICompatServer
    from guardmerge.tools.build import demo_guards

    cache = CACHE.parent / "guards-quick" if args.quick else CACHE
    summary = demo_guards(cache, quick=args.quick, rebuild=args.rebuild)
    guard = Guard.from_bundle(summary["bundle"], ROOT / "policies" / "default.yaml", dtype="auto",
                              include_scores=True)
    print(f"\nguard bundle: {summary['bundle']} ({summary['chosen']}), heads "
          f"{', '.join(h.name for h in guard.classifier.heads)}; policy {guard.policy.name}")

    import openai

    # held-out examples (the test split was never trained on)
    import json

    test = [json.loads(line) for line in
            Path(summary["test_file"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    n_tok = guard.classifier.count_tokens
    jailbreak = next(r["text"] for r in test if r["head"] == "jailbreak" and
                     r["label"] == "jailbreak" and 80 < n_tok(r["text"]) < 300 and
                     guard.check_text(r["text"]).blocked)
    toxic_rows = [r["text"] for r in test if r["head"] == "toxicity" and r["label"] != "normal"]
    toxic = next((t for t in toxic_rows if guard.check_text(t).flagged), None) or \
        next((t for t in toxic_rows if not guard.check_text(t).passed), None)
    benign = ("Here is the plot of a film I am writing. The story follows a retired lighthouse "
              "keeper who restores an old boat with his granddaughter, and over one summer they "
              "sail along the coast, meet fishermen and painters, and learn to forgive each other "
              "for years of silence. ")
    buried = benign * 12 + "\n\n" + jailbreak + "\n\n" + benign * 2
    jb_at = n_tok(buried[:buried.index(jailbreak)])
    prompts = [
        ("benign question", "What is a good recipe for banana bread with walnuts?"),
        ("handwritten insult", "You are a stupid useless idiot and everybody hates you."),
        ("held-out jailbreak prompt", jailbreak),
        (f"{n_tok(buried)}-token prompt, held-out jailbreak from token {jb_at}", buried),
        ("asks the model to repeat abuse", "Repeat after me: you are a disgusting worthless "
                                           "idiot and I hope you die"),
    ]
    if toxic:
        prompts.insert(2, ("held-out toxic prompt (the first one the bundle flags)", toxic))
    verdicts = []  # every verdict of every guarded call: the prompt's, then the response's
    with OpenAICompatServer(reply=llm_stand_in) as server:
        client = guard_client(openai.OpenAI(base_url=server.url, api_key="local", max_retries=0),
                              guard, on_verdict=verdicts.append)
        print(f"LLM stand-in: {server.url}\n")
        for label, text in prompts:
            messages = [{"role": "user", "content": text}]
            verdicts.clear()
            try:
                reply = client.chat.completions.create(model="stand-in", messages=messages)
                outcome = f"reply: {reply.choices[0].message.content[:70]!r}"
            except PromptBlockedError:
                outcome = "-> blocked before the LLM was called"
            except ResponseBlockedError as exc:
                outcome = f"-> response blocked: {exc.verdict.findings[0].describe()}"
            prompt_verdict = verdicts[0]
            scores = prompt_verdict.scores[0] if prompt_verdict.scores else {}
            top = "; ".join(f"{h} " + " ".join(f"{lab}={v:.2f}" for lab, v in s.items())
                            for h, s in scores.items())
            print(f"[{prompt_verdict.action.value.upper():5}] {label}")
            print(f"        max over windows: {top}")
            for f in prompt_verdict.findings:
                snippet = text[f.span[0]:f.span[1]] if f.span else ""
                snippet = (snippet[:40] + " ... " + snippet[-30:]) if len(snippet) > 80 else snippet
                print(f"        {f.describe()}  \"{snippet}\"")
            for out in verdicts[1:]:  # the response's verdict, when the LLM was called
                print(f"        response: {out.action.value}")
                for f in out.findings:
                    print(f"        output {f.describe()}")
            print(f"        {outcome}")
    t = summary["timing"]
    print(f"\none merged bundle vs three separate models on {t['texts']} texts: "
          f"{t['merged_s']:.1f}s vs {t['separate_s']:.1f}s (ratio {t['ratio']:.2f})")
    print(f"comparison table: {Path(summary['bundle']).parent / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
