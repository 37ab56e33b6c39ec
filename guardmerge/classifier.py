"""The multi-head guard runtime: one model, all heads, every window of a call in one pass.

``BundleClassifier.classify(texts)`` tokenises each text once, cuts it into overlapping windows
(sized and wrapped in special tokens as the model's tokenizer and config say), runs all windows
of all texts as length-sorted, dynamically padded batches through the guard model (one encoder
pass, then each head's own modules: ``guardmerge._model``), turns each head's slice of the logits
into probabilities (softmax for a single-label head, a sigmoid per label for a multi-label one),
and keeps, per label, the maximum over windows and the window that gave it. ``FunctionClassifier`` is a model-free stand-in with the same interface,
for tests and for wiring checks.

torch and transformers are imported when a model is loaded, not when this module is: the
interface, the scores and ``FunctionClassifier`` need neither.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Mapping  # isinstance on it: typing.Mapping is several times slower
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from ._options import option
from .bundle import BundleInfo, inspect_bundle
from .chunking import Window, plan_windows
from .exceptions import ClassifierError, ConfigError, ModelLoadError
from .labels import Head, heads_from_layout

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Classifier",
    "BundleClassifier",
    "FunctionClassifier",
    "RuntimeOptions",
    "TextScores",
    "HeadScores",
    "per_head_probabilities",
    "resolve_dtype",
    "validate_scores",
]

logger = logging.getLogger("guardmerge.classifier")

DType = Literal["float32", "bfloat16", "float16", "auto"]
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "auto": "auto"}
DEFAULT_OVERLAP = 64


def dtype_name(dtype: Any) -> str:
    """``"bf16" | "BFloat16" | torch.bfloat16 | ...`` -> ``"bfloat16"`` (no torch import);
    a ConfigError naming the choices for anything else."""
    text = str(dtype).lower()
    name = _DTYPE_NAMES.get(text[len("torch."):] if text.startswith("torch.") else text)
    if name is None:
        raise ConfigError(f"dtype: unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return name


@dataclass(frozen=True)
class RuntimeOptions:
    """How a bundle is loaded and run (``BundleClassifier.from_pretrained`` and the CLI's
    ``--dtype / --threads / --batch-size / --overlap / --max-length``)."""

    dtype: DType = option("float32", "weights and activations: float32, bfloat16, float16, or "
                          "auto (bfloat16 where the CPU has native bf16, else float32)",
                          parse=dtype_name)
    threads: int | None = option(None, "torch CPU threads (process-wide; default: torch's own)")
    batch_size: int = option(8, "windows per forward pass")
    overlap: int | None = option(None, "tokens shared by adjacent windows (default 64, or "
                                 "window - 1 for a shorter window)")
    max_length: int | None = option(None, "tokens per window including the special tokens "
                                    "(default: the model's limit)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.overlap is not None and self.overlap < 0:
            raise ConfigError(f"overlap: must be >= 0, got {self.overlap}")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"max_length: must be >= 3 (two special tokens and one more), "
                              f"got {self.max_length}")


def resolve_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    """``"float32" | "bfloat16" | "float16" | "auto" | torch.dtype`` -> torch dtype.

    ``auto`` picks bfloat16 where the CPU has native bf16 support (AVX512-BF16 / AMX), which is
    faster than fp32 for BERT-size models there, and float32 elsewhere.
    """
    import torch

    name = dtype_name(dtype)
    if name == "auto":
        try:
            fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # pragma: no cover - older builds
            fast = False
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


@dataclass
class HeadScores:
    """One head's result for one text.

    ``window_probs[w]`` is this head's probabilities for window ``w``: a softmax over its labels
    (sums to 1) for a single-label head, each label's own sigmoid for a multi-label head.
    ``scores[label]`` is the label's maximum over windows and ``windows[label]`` the window that
    gave it. For a text that fits one window, ``scores`` is that window's distribution.
    """

    head: str
    labels: tuple[str, ...]
    scores: dict[str, float]
    windows: dict[str, int]
    window_probs: list[dict[str, float]]
    multi_label: bool = False

    @property
    def predicted(self) -> str | tuple[str, ...]:
        """The head's prediction: its top label, or for a multi-label head every label whose
        score is at least 0.5 (in label order; possibly none)."""
        if self.multi_label:
            return tuple(lab for lab in self.labels if self.scores[lab] >= 0.5)
        return self.top[0]

    @property
    def top(self) -> tuple[str, float]:
        """The label with the highest score, and that score (ties: the first label)."""
        label = max(self.labels, key=lambda lab: self.scores[lab])
        return label, self.scores[label]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "windows": dict(self.windows)}


@dataclass
class TextScores:
    """Every head's scores for one text, and the windows it was cut into."""

    text_index: int
    n_tokens: int
    scanned_tokens: int
    windows: list[Window]
    heads: dict[str, HeadScores]
    text_length: int = 0

    @property
    def truncated(self) -> bool:
        """True when the text was longer than the token budget and only its start was scored."""
        return self.scanned_tokens < self.n_tokens

    @property
    def scanned_chars(self) -> int:
        return max((w.char_end for w in self.windows), default=0)

    def score(self, head: str, label: str) -> float:
        return self.heads[head].scores[label]

    def window_for(self, head: str, label: str) -> Window:
        """The window in which ``label`` of ``head`` reached its maximum."""
        return self.windows[self.heads[head].windows[label]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "scanned_tokens": self.scanned_tokens,
            "windows": [w.to_dict() for w in self.windows],
            "heads": {name: hs.to_dict() for name, hs in self.heads.items()},
        }


class Classifier:
    """Interface every guard model implements (subclass it for a custom model).

    ``heads`` are the model's heads in logit order; ``name`` says what the model is (a bundle's
    path, for instance) in reports and logs.
    """

    heads: tuple[Head, ...] = ()
    name: str = ""

    def classify(self, texts: Sequence[str], *, max_tokens: int | None = None) -> list[TextScores]:
        raise NotImplementedError

    def relabel(self, labels: Sequence[str]) -> None:
        """Give a single-head classifier meaningful label names (e.g. for LABEL_0, LABEL_1)."""
        if len(self.heads) != 1:
            raise ConfigError("relabel() applies to single-head classifiers only")
        h = self.heads[0]
        if len(labels) != h.size:
            raise ConfigError(f"{len(labels)} label names given; the model has {h.size} labels")
        self.heads = (replace(h, labels=tuple(labels), offset=0),)


_SLACK = 1e-4  # float32 softmax rounding
_SUM_SLACK = 1e-3  # a single-label head's window distribution sums to 1 (bfloat16 rounding)


def validate_scores(results: Any, n_texts: int, heads: Sequence[Head], name: str) -> None:
    """A ``ClassifierError`` unless ``results`` is one ``TextScores`` per text, each with every
    head and exactly its labels, finite probabilities in [0, 1] and valid window indices; for a
    single-label (softmax) head each window's distribution must also sum to 1, while a
    multi-label (sigmoid) head's labels are independent and may sum to anything.

    A guard that gets fewer results than texts, a missing head or a NaN would otherwise pass
    text it never scored; the guard treats this error as a failure (``on_error``).
    """
    where = f"classifier {name or '?'}"
    if not isinstance(results, (list, tuple)) or len(results) != n_texts:
        got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
        raise ClassifierError(f"{where} returned {got} results for {n_texts} texts")
    for i, r in enumerate(results):
        if not isinstance(r, TextScores):
            raise ClassifierError(f"{where}: result {i} is a {type(r).__name__}, not TextScores")
        if not isinstance(r.heads, Mapping) or not isinstance(r.windows, list) or not r.windows:
            raise ClassifierError(f"{where}: result {i} has no heads or no windows")
        for h in heads:
            hs = r.heads.get(h.name)
            if not isinstance(hs, HeadScores):
                raise ClassifierError(f"{where}: result {i} has no head {h.name!r}")
            if not isinstance(hs.scores, Mapping) or set(hs.scores) != set(h.labels) or \
                    not isinstance(hs.windows, Mapping) or set(hs.windows) != set(h.labels):
                got = sorted(map(str, hs.scores)) if isinstance(hs.scores, Mapping) else hs.scores
                raise ClassifierError(f"{where}: result {i}, head {h.name!r}: labels {got}, "
                                      f"expected {list(h.labels)}")
            for label in h.labels:
                v, w = hs.scores[label], hs.windows[label]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                        or not -_SLACK <= v <= 1 + _SLACK:
                    raise ClassifierError(f"{where}: result {i}, {h.name}:{label} = {v!r} is not "
                                          "a probability (finite, in [0, 1])")
                if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < len(r.windows):
                    raise ClassifierError(f"{where}: result {i}, {h.name}:{label}: window {w!r} "
                                          f"is not one of its {len(r.windows)} windows")
            if not h.multi_label and isinstance(hs.window_probs, list):
                for w, dist in enumerate(hs.window_probs):
                    total = sum(float(v) for v in dist.values()) if isinstance(dist, Mapping) \
                        else math.nan
                    if not abs(total - 1.0) <= _SUM_SLACK:
                        raise ClassifierError(f"{where}: result {i}, head {h.name!r}, window {w}: "
                                              f"probabilities sum to {total!r}, not 1 (a "
                                              "single-label head's labels exclude each other)")


def check_finite_weights(model: Any, where: str) -> None:
    """A ``ModelLoadError`` naming the first parameter or buffer holding NaN or infinity."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"{where}: tensor {name!r} holds NaN or infinite values; a "
                                 "guard with non-finite weights cannot score text")


def per_head_probabilities(logits: "torch.Tensor", heads: Sequence[Head]) -> "torch.Tensor":
    """Each head's slice of the last dimension as probabilities, separately (float32 result):
    a softmax over a single-label head's labels, a sigmoid of each logit of a multi-label
    head."""
    import torch

    logits = logits.float()
    out = torch.empty_like(logits)
    for h in heads:
        part = logits[..., h.offset:h.stop]
        out[..., h.offset:h.stop] = torch.sigmoid(part) if h.multi_label else \
            torch.softmax(part, dim=-1)
    return out


def _aggregate(text_index: int, windows: list[Window], rows: list[list[float]],
               heads: Sequence[Head], n_tokens: int, scanned: int, length: int) -> TextScores:
    """Per head and label: the maximum over windows and the (first) window that gave it."""
    result: dict[str, HeadScores] = {}
    for h in heads:
        part = [row[h.offset:h.stop] for row in rows]
        scores: dict[str, float] = {}
        best_window: dict[str, int] = {}
        for j, lab in enumerate(h.labels):
            column = [r[j] for r in part]
            best = max(range(len(column)), key=column.__getitem__) if column else 0
            scores[lab] = float(column[best]) if column else 0.0
            best_window[lab] = best
        result[h.name] = HeadScores(head=h.name, labels=h.labels, scores=scores,
                                    windows=best_window,
                                    window_probs=[dict(zip(h.labels, r)) for r in part],
                                    multi_label=h.multi_label)
    return TextScores(text_index=text_index, n_tokens=n_tokens, scanned_tokens=scanned,
                      windows=windows, heads=result, text_length=length)


@dataclass
class RuntimeStats:
    """Counters (thread-safe): calls, texts, windows and batched forward passes run."""

    calls: int = 0
    texts: int = 0
    windows: int = 0
    forward_passes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, texts: int, windows: int, passes: int) -> None:
        with self._lock:
            self.calls += 1
            self.texts += texts
            self.windows += windows
            self.forward_passes += passes


@dataclass
class Prepared:
    """Texts tokenised and cut into windows, ready to score (see ``BundleClassifier.prepare``)."""

    items: list[tuple[int, int, list[int]]]
    per_text: list[tuple[list[Window], int, int, int]]

    @property
    def windows(self) -> int:
        """How many windows (rows of a forward pass) these texts are."""
        return len(self.items)

    @property
    def longest(self) -> int:
        """Tokens in the longest window, special tokens included (the padded width)."""
        return max((len(ids) for _, _, ids in self.items), default=0)

    def select(self, text_indices: Sequence[int]) -> "Prepared":
        """The prepared texts ``text_indices`` (in that order, renumbered from 0), without
        tokenising them again."""
        new = {old: k for k, old in enumerate(text_indices)}
        items = sorted(((new[ti], wi, ids) for ti, wi, ids in self.items if ti in new),
                       key=lambda x: (x[0], x[1]))
        per_text = [([replace(w, text_index=k) for w in self.per_text[old][0]],
                     *self.per_text[old][1:]) for k, old in enumerate(text_indices)]
        return Prepared(items=items, per_text=per_text)


def _window_overlap(overlap: int | None, window_tokens: int) -> int:
    if overlap is None:
        return min(DEFAULT_OVERLAP, window_tokens - 1)
    if not 0 <= overlap < window_tokens:
        raise ConfigError(f"overlap: must be in [0, {window_tokens - 1}] for windows of "
                          f"{window_tokens} tokens, got {overlap}")
    return int(overlap)


def load_tokenizer(folder: Any) -> Any:
    """A bundle's (or source's) tokenizer, no remote code; a ModelLoadError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        spm = sentencepiece_only(folder)
        if spm is not None and not _has_sentencepiece():
            raise ModelLoadError(
                f"{folder}: the tokenizer is a SentencePiece model ({spm}) without tokenizer.json; "
                "converting it needs the sentencepiece and protobuf packages: pip install "
                "'guardmerge[sentencepiece]' (a bundle merged from it carries the converted "
                "tokenizer.json and loads without them)") from exc
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {exc}") from exc


def sentencepiece_only(folder: Any) -> str | None:
    """The SentencePiece model file of a tokenizer folder that has no ``tokenizer.json``."""
    path = Path(folder) if isinstance(folder, (str, os.PathLike)) else None
    if path is None or not path.is_dir() or (path / "tokenizer.json").exists():
        return None
    for name in ("spm.model", "sentencepiece.bpe.model"):
        if (path / name).is_file():
            return name
    return None


def _has_sentencepiece() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("sentencepiece", "google.protobuf"))
    except ModuleNotFoundError:  # no ``google`` package at all
        return False


_PROBE = "hello world"


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text (``[CLS]`` / ``[SEP]``, ``<s>`` /
    ``</s>`` ...): what ``tokenizer(text)`` adds, so a window is exactly what the model was
    fine-tuned on."""
    try:
        wrapped = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
        bare = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    except Exception as exc:
        raise ModelLoadError(f"cannot probe the tokenizer's special tokens: {exc}") from exc
    for start in range(len(wrapped) - len(bare) + 1):
        if wrapped[start:start + len(bare)] == bare:
            return wrapped[:start], wrapped[start + len(bare):]
    raise ModelLoadError(f"the tokenizer's special tokens do not wrap the text ({bare} became "
                         f"{wrapped}); guardmerge cannot cut its windows")


def window_limit(info: BundleInfo, tokenizer: Any) -> int:
    """Tokens per window (special tokens included) the model takes: its config's position limit
    (``max_position_embeddings``, less RoBERTa's padding offset; ModernBERT's 8192) and the
    tokenizer's ``model_max_length``, whichever is smaller (an unset one is ignored)."""
    config = info.config
    limit = info.family.max_positions(config) if info.family else \
        config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        limit = 512
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limit = min(limit, tok_max)
    return int(limit)


class BundleClassifier(Classifier):
    """A loaded guard bundle. Thread-safe: load once, call from many threads."""

    def __init__(self, model: Any, tokenizer: Any, heads: Sequence[Head], *,
                 info: BundleInfo | None = None, max_length: int = 512,
                 overlap: int | None = None, batch_size: int = 8) -> None:
        from ._model import as_guard_model

        RuntimeOptions(batch_size=batch_size, overlap=overlap, max_length=max_length)  # checks
        self.heads = tuple(heads)
        self.model = as_guard_model(model, self.heads)
        self.tokenizer = tokenizer
        self.info = info
        self.name = str(info.path) if info else type(model).__name__
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError("guardmerge needs a fast (tokenizers-backed) tokenizer with offsets")
        # A private copy with no truncation / padding: encode_batch on it never mutates state,
        # so several threads may tokenise at once.
        from tokenizers import Tokenizer

        self._encoder = Tokenizer.from_str(backend.to_str())
        self._encoder.no_truncation()
        self._encoder.no_padding()
        self.prefix_ids, self.suffix_ids = special_tokens(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = int(max_length)
        self.window_tokens = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.window_tokens < 1:
            raise ConfigError(f"max_length: {max_length} leaves no room beside the tokenizer's "
                              f"{len(self.prefix_ids) + len(self.suffix_ids)} special tokens")
        self.overlap = _window_overlap(overlap, self.window_tokens)
        self.batch_size = int(batch_size)
        self.stats = RuntimeStats()
        self.dtype = next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str], *, revision: str | None = None,
                        options: RuntimeOptions | None = None,
                        **overrides: Any) -> "BundleClassifier":
        """Load a bundle (local folder or Hub id), validated.

        ``options`` (a ``RuntimeOptions``) or its fields as keywords: ``dtype`` (float32 /
        bfloat16 / float16 / auto), ``threads`` (torch's intra-op threads, process-wide, as
        torch defines it), ``batch_size``, ``overlap``, ``max_length``.
        """
        import torch

        from ._model import load_guard_model

        opts = replace(options or RuntimeOptions(), **overrides) if overrides else \
            (options or RuntimeOptions())
        info = inspect_bundle(model, revision=revision)
        torch_dtype = resolve_dtype(opts.dtype)
        if opts.threads is not None:
            torch.set_num_threads(int(opts.threads))
        tokenizer = load_tokenizer(info.path)
        net = load_guard_model(info, torch_dtype)
        check_finite_weights(net, str(info.path))
        limit = window_limit(info, tokenizer)
        if opts.max_length is not None:
            if opts.max_length > limit:
                raise ConfigError(f"max_length: must be in [3, {limit}] for {info.path}, got "
                                  f"{opts.max_length}")
            limit = opts.max_length
        logger.info("loaded bundle %s: heads=%s dtype=%s max_length=%d", info.path,
                    [h.name for h in info.heads], torch_dtype, limit)
        return cls(net, tokenizer, info.heads, info=info, max_length=limit,
                   overlap=opts.overlap, batch_size=opts.batch_size)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is (without special tokens), as the windows count them."""
        return len(self._encoder.encode(text, add_special_tokens=False).ids)

    # -- the hot path ------------------------------------------------------------------------

    def classify(self, texts: Sequence[str], *, max_tokens: int | None = None) -> list[TextScores]:
        """Score every text on every head. ``max_tokens``: score only each text's first N tokens."""
        return self.classify_prepared(self.prepare(texts, max_tokens=max_tokens))

    def prepare(self, texts: Sequence[str], *, max_tokens: int | None = None) -> "Prepared":
        """Tokenise and cut into windows once; ``classify_prepared`` may then run many times
        (the model search re-scores the same evaluation texts with every candidate's weights)."""
        if isinstance(texts, str):
            raise TypeError("classify() takes a sequence of texts, not a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        try:
            encodings = self._encoder.encode_batch(texts, add_special_tokens=False) if texts else []
        except Exception as exc:
            raise ClassifierError(f"tokenisation failed ({type(exc).__name__})") from exc
        items: list[tuple[int, int, list[int]]] = []  # (text, window, ids)
        per_text: list[tuple[list[Window], int, int, int]] = []
        for ti, enc in enumerate(encodings):
            ids, offsets = enc.ids, enc.offsets
            n = len(ids)
            scan = n if max_tokens is None else min(n, max_tokens)
            windows = []
            for wi, (s, e) in enumerate(plan_windows(scan, self.window_tokens, self.overlap)):
                cs = offsets[s][0] if e > s else 0
                ce = offsets[e - 1][1] if e > s else 0
                windows.append(Window(ti, wi, s, e, cs, ce))
                items.append((ti, wi, [*self.prefix_ids, *ids[s:e], *self.suffix_ids]))
            per_text.append((windows, n, scan, len(texts[ti])))
        return Prepared(items=items, per_text=per_text)

    def classify_prepared(self, prepared: "Prepared") -> list[TextScores]:
        return self.classify_batch([prepared])[0]

    def classify_batch(self, parts: Sequence["Prepared"]) -> list[list[TextScores]]:
        """Score several prepared calls in shared forward passes: the seam of cross-request
        batching (``guardmerge serve``). The windows of every part are pooled, length-sorted and
        padded per pass exactly as one call's are, so a text scores the same whichever part or
        batch it came in; the result is one list of ``TextScores`` per part."""
        items: list[tuple[int, int, list[int]]] = []
        offsets = []
        offset = 0
        for part in parts:
            offsets.append(offset)
            items += [(offset + ti, wi, ids) for ti, wi, ids in part.items]
            offset += len(part.per_text)
        probs = self._run(items) if items else {}
        out = []
        for part, offset in zip(parts, offsets):
            scores = []
            for ti, (windows, n, scan, length) in enumerate(part.per_text):
                rows = [probs[(offset + ti, w.index)] for w in windows]
                scores.append(_aggregate(ti, windows, rows, self.heads, n, scan, length))
            out.append(scores)
        return out

    def _run(self, items: list[tuple[int, int, list[int]]]) -> dict[tuple[int, int], list[float]]:
        import torch

        order = sorted(range(len(items)), key=lambda k: -len(items[k][2]))
        results: dict[tuple[int, int], list[float]] = {}
        passes = 0
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    batch = [items[k] for k in order[start:start + self.batch_size]]
                    width = len(batch[0][2])
                    input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, (_, _, ids) in enumerate(batch):
                        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                        mask[row, :len(ids)] = 1
                    # one segment: token type 0 everywhere (passed only to encoders that read it)
                    logits = self.model(input_ids=input_ids, attention_mask=mask,
                                        token_type_ids=torch.zeros_like(input_ids)).logits
                    passes += 1
                    rows = per_head_probabilities(logits, self.heads).tolist()
                    for row, (ti, wi, _) in enumerate(batch):
                        results[(ti, wi)] = rows[row]
        except Exception as exc:
            raise ClassifierError(f"guard model forward pass failed ({type(exc).__name__})") \
                from exc
        self.stats.add(len({ti for ti, _, _ in items}), len(items), passes)
        return results


class FunctionClassifier(Classifier):
    """A model-free classifier: ``fn(text) -> {head: {label: probability}}``.

    For tests and wiring checks, the way ``httpx.MockTransport`` stands in for a network. The
    text is one window; its token count is its whitespace-separated word count. Labels a
    function leaves out share what is left of the head's probability mass equally (a
    multi-label head's, given as ``Head`` objects, score 0).

    >>> clf = FunctionClassifier({"jb": ["benign", "jailbreak"]},
    ...     lambda t: {"jb": {"jailbreak": 0.99 if "ignore previous" in t else 0.01}})
    """

    def __init__(self, heads: Mapping[str, Sequence[str]] | Sequence[Head],
                 fn: Callable[[str], Mapping[str, Mapping[str, float]]], *,
                 name: str = "function") -> None:
        if isinstance(heads, Mapping):
            self.heads = heads_from_layout(heads.items())
        else:
            self.heads = tuple(heads)
        self.fn = fn
        self.name = name
        self.stats = RuntimeStats()

    def classify(self, texts: Sequence[str], *, max_tokens: int | None = None) -> list[TextScores]:
        out = []
        for ti, text in enumerate(texts):
            words = text.split()
            n = len(words)
            scan_text = text
            scanned = n
            if max_tokens is not None and n > max_tokens:
                scanned = max_tokens
                # character end of the last scanned word
                pos = 0
                for w in words[:max_tokens]:
                    pos = text.index(w, pos) + len(w)
                scan_text = text[:pos]
            raw = self.fn(scan_text) or {}
            row = [0.0] * sum(h.size for h in self.heads)
            for h in self.heads:
                given = dict(raw.get(h.name, {}))
                unknown = set(given) - set(h.labels)
                if unknown:
                    raise ClassifierError(f"function returned unknown labels {sorted(unknown)} "
                                          f"for head {h.name!r}")
                rest = [lab for lab in h.labels if lab not in given]
                left = 0.0 if h.multi_label else max(0.0, 1.0 - sum(given.values()))
                for j, lab in enumerate(h.labels):
                    row[h.offset + j] = float(given.get(lab, left / len(rest) if rest else 0.0))
            window = Window(ti, 0, 0, scanned, 0, len(scan_text))
            out.append(_aggregate(ti, [window], [row], self.heads, n, scanned, len(text)))
        self.stats.add(len(out), len(out), 1 if out else 0)
        return out
