"""The guard model: one encoder pass per window, then every head's own modules on what it reads.

``GuardModel`` holds a model family's encoder (``families``), the HM3 output layer, and the head
modules, grouped: a plain bundle has one group (the classifier's own head modules, if any,
shared by every head), a per-head bundle one group per head (its modules under ``heads.<i>.``).
``forward`` runs the encoder once, reads its output the family's way (pooler output, first
token, or ``classifier_pooling``), runs each group's head steps on it, and applies that group's
rows of the output layer: the cost of N heads is one encoder pass plus N small heads.

Its state dict names are the bundle's tensor names, so the merge writes, the search overwrites
and the re-fit reads the same names. A plain classifier of a family guardmerge does not know is
run as transformers runs it (``OpaqueModel``): it can be scored, not merged.

torch and transformers are imported here; the library imports this module only once a model
is loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .bundle import PER_HEAD, PLAIN, BundleInfo
from .exceptions import ModelLoadError
from .families import Family
from .labels import Head

__all__ = ["GuardModel", "OpaqueModel", "GuardOutput", "load_guard_model", "guard_skeleton",
           "as_guard_model", "head_groups", "save_weights"]


@dataclass
class GuardOutput:
    """What a forward pass returns: ``logits`` ``[batch, all labels]`` (like transformers)."""

    logits: torch.Tensor


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root``, creating plain containers."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(leaf, module)


def head_groups(heads: Sequence[Head]) -> list[tuple[str | None, list[Head]]]:
    """Heads grouped by the modules they read: (prefix or None for the plain modules, heads),
    in logit order (a group's heads are consecutive)."""
    groups: list[tuple[str | None, list[Head]]] = []
    for h in heads:
        if groups and groups[-1][0] == h.modules:
            groups[-1][1].append(h)
        else:
            groups.append((h.modules, [h]))
    prefixes = [p for p, _ in groups]
    if len(set(prefixes)) != len(prefixes):
        raise ModelLoadError(f"heads reading the same modules must be consecutive: {prefixes}")
    return groups


class GuardModel(nn.Module):
    """Encoder once, each head group's modules on what it reads, its rows of the output layer."""

    def __init__(self, config: Any, family: Family, heads: Sequence[Head], encoder: nn.Module,
                 output: nn.Linear, modules: Mapping[str | None, Mapping[str, nn.Module]]) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.config = config
        self.family = family
        self.guard_heads = tuple(heads)  # ("heads" is the per-head modules' container)
        _attach(self, family.encoder, encoder)
        _attach(self, family.output, output)
        self.token_types = family.takes_token_types(config.to_dict())
        self.pooling = getattr(config, "classifier_pooling", "cls") if family.reads == "pooling" \
            else None
        self.groups: list[tuple[list[Any], int, int, tuple[str, ...]]] = []
        for prefix, members in head_groups(self.guard_heads):
            own = modules[prefix]
            steps: list[Any] = []
            for step in family.head:
                if step.startswith("act:"):
                    name = step[4:]
                    if name.startswith("@"):
                        name = str(getattr(config, name[1:]))
                    steps.append(ACT2FN[name])
                else:
                    module = own[step]
                    _attach(self, (prefix or "") + step, module)
                    steps.append(module)
            self.groups.append((steps, members[0].offset, members[-1].stop,
                                tuple(h.name for h in members)))

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.family.encoder)

    @property
    def output_layer(self) -> nn.Linear:
        return self.get_submodule(self.family.output)  # type: ignore[return-value]

    def group_of(self, head: str) -> int:
        return next(i for i, g in enumerate(self.groups) if head in g[3])

    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output as the family's heads read it (``[batch, hidden]``)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        if self.family.reads == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.family.reads == "first_token" or self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling != "mean":
            raise ModelLoadError(f"classifier_pooling {self.pooling!r} is not cls or mean")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return (hidden * attention_mask.unsqueeze(-1)).sum(dim=1) / \
            attention_mask.sum(dim=1, keepdim=True)

    def group_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head group, its head steps (own modules, activations) on the encoder's read
        output ``x``: what the group's rows of the output layer read."""
        out = []
        for steps, _, _, _ in self.groups:
            h = x
            for step in steps:
                h = step(h)
            out.append(h)
        return out

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per head group, what its rows of the output layer read (``[batch, hidden]``)."""
        return self.group_features(self.read(input_ids, attention_mask, token_type_ids))

    def heads_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every head on the encoder's read output ``x``: the part of a forward pass after the
        one encoder pass (``[batch, all labels]``)."""
        feats = self.group_features(x)
        layer = self.output_layer
        if len(self.groups) == 1:  # the module itself: its hooks see what it reads (RegMean)
            return layer(feats[0])
        parts = []
        for h, (_, start, stop, _) in zip(feats, self.groups):
            bias = layer.bias[start:stop] if layer.bias is not None else None
            parts.append(nn.functional.linear(h, layer.weight[start:stop], bias))
        return torch.cat(parts, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> GuardOutput:
        return GuardOutput(logits=self.heads_logits(
            self.read(input_ids, attention_mask, token_type_ids)))

    @classmethod
    def from_classifier(cls, net: Any, family: Family, heads: Sequence[Head]) -> "GuardModel":
        """Wrap a transformers sequence classifier (plain layout): its modules, not copies."""
        if any(h.modules is not None for h in heads):
            raise ModelLoadError("a transformers classifier has plain heads only")
        modules = {None: {m: net.get_submodule(m) for m in family.head_modules}}
        model = cls(net.config, family, heads, net.get_submodule(family.encoder),
                    net.get_submodule(family.output), modules)
        return model.train(net.training)


class OpaqueModel(nn.Module):
    """A plain classifier of a family guardmerge cannot split: run as transformers runs it."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net
        self.config = net.config
        self.family = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> GuardOutput:
        return GuardOutput(logits=self.net(input_ids=input_ids,
                                           attention_mask=attention_mask).logits)


def as_guard_model(model: Any, heads: Sequence[Head]) -> nn.Module:
    """``model`` as a guard model: a GuardModel / OpaqueModel as it is, a transformers
    classifier wrapped (its family's GuardModel, or opaque for an unknown family)."""
    from .families import FAMILIES

    if isinstance(model, (GuardModel, OpaqueModel)):
        return model
    family = FAMILIES.get(str(getattr(model.config, "model_type", "")))
    if family is None:
        return OpaqueModel(model)
    return GuardModel.from_classifier(model, family, heads)


def guard_skeleton(config: Mapping[str, Any] | Any, family: Family, heads: Sequence[Head], *,
                   dtype: torch.dtype = torch.float32) -> GuardModel:
    """A GuardModel of this architecture and head layout with freshly initialised weights (to
    be overwritten: a load, a search trial). Under ``torch.device("meta")`` it has no storage."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not hasattr(config, "to_dict"):
        config = AutoConfig.for_model(**dict(config))
    net = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    if not any(h.modules is not None for h in heads):
        return GuardModel.from_classifier(net, family, heads).eval()
    modules: dict[str | None, dict[str, nn.Module]] = {}
    for h in heads:
        if h.modules is None:
            raise ModelLoadError(f"head {h.name!r}: every head of a {PER_HEAD} bundle has "
                                 "its own modules")
        modules[h.modules] = {m: copy.deepcopy(net.get_submodule(m)) for m in family.head_modules}
    model = GuardModel(net.config, family, heads, net.get_submodule(family.encoder),
                       net.get_submodule(family.output), modules)
    return model.eval()


def _load_weights(model: nn.Module, files: Sequence[Path], where: str) -> None:
    """Every tensor of ``files`` into ``model`` by name, strictly: an unknown tensor, a shape
    that differs or a tensor the model needs and the files lack is a ModelLoadError."""
    from safetensors import safe_open

    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    needed = set(model.state_dict())
    seen: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    target = targets.get(name)
                    if target is None:
                        raise ModelLoadError(f"{f}: tensor {name!r} is not part of the "
                                             f"{where} guard model")
                    tensor = fh.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(f"{f}: tensor {name!r} has shape "
                                             f"{list(tensor.shape)}, the model expects "
                                             f"{list(target.shape)}")
                    target.copy_(tensor.to(target.dtype))
                    seen.add(name)
    missing = sorted(needed - seen)
    if missing:
        raise ModelLoadError(f"{files[0]}: missing tensors {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} (needed by the {where} "
                             "guard model)")


def load_guard_model(info: BundleInfo, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The bundle's guard model (eval mode): a plain bundle through transformers'
    ``from_pretrained`` (safetensors, no remote code), a per-head bundle built from its config
    and loaded strictly from ``guardmerge.safetensors``."""
    from transformers import AutoModelForSequenceClassification

    if info.layout == PLAIN:
        try:
            net = AutoModelForSequenceClassification.from_pretrained(
                info.path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"{info.path}: cannot load the model: {exc}") from exc
        net.eval()
        if info.family is None:
            return OpaqueModel(net).eval()
        return GuardModel.from_classifier(net, info.family, info.heads).eval()
    assert info.family is not None
    try:
        model = guard_skeleton(info.config, info.family, info.heads, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{info.path}: cannot build the {info.family.name} model from "
                             f"config.json: {exc}") from exc
    _load_weights(model, info.weight_files, f"{info.family.name} {PER_HEAD}")
    return model.eval()


def save_weights(model: nn.Module, path: Path) -> None:
    """A guard model's weights as one safetensors file under the bundle's tensor names
    (sorted, ``format: pt``: for a plain bundle, what transformers writes and reads)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in sorted(model.state_dict().items())}
    save_file(state, str(path), metadata={"format": "pt"})
