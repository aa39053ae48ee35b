"""Collapse statistics of a causal language model: hidden states against next-token labels.

:func:`collect_lm_features` runs the model once per batch and streams the hidden states of one layer, or of
several layers at once, into :class:`~etfkern.collapse.CollapseMeter` objects. Metric definitions:
docs/metrics.md.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

if TYPE_CHECKING:  # the meter is imported at call time: etfkern.collapse re-exports this module
    from etfkern.collapse import CollapseMeter

__all__ = ["collect_lm_features"]


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _model_device(model: Any) -> torch.device | None:
    """Where the model's inputs must live: ``model.device`` (Hugging Face models), else its first parameter's
    device, else None (leave inputs where they are)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None


def _check_layers(layer: int, layers: Sequence[int] | None) -> list[int]:
    """The requested layer indices (Python ints, as given), or ValueError naming the argument."""
    if layers is None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
        return [layer]
    if layer != -1:
        raise ValueError(f"pass layer or layers, not both (got layer={layer!r} and layers={layers!r})")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a sequence of ints, got {type(layers).__name__}")
    out = list(layers)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) for v in out):
        raise ValueError(f"layers must be a non-empty sequence of ints, got {layers!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat an index, got {out}")
    return out


def _check_layer_range(wanted: list[int], num_hidden: int, argname: str) -> None:
    bad = [v for v in wanted if not -num_hidden <= v < num_hidden]
    if bad:
        raise ValueError(f"{argname} {bad[0] if len(bad) == 1 else bad} out of range: the model returns "
                         f"{num_hidden} hidden states (the embeddings and {num_hidden - 1} layers), so valid "
                         f"indices are {-num_hidden}..{num_hidden - 1}")


def _check_meters(meter: Any, wanted: list[int], multi: bool) -> dict[int, "CollapseMeter"] | None:
    from etfkern.collapse import CollapseMeter

    if meter is None:
        return None
    if not multi:
        if not isinstance(meter, CollapseMeter):
            raise ValueError(f"meter must be a CollapseMeter or None, got {type(meter).__name__}")
        return {wanted[0]: meter}
    if not isinstance(meter, Mapping) or set(meter) != set(wanted) or \
            not all(isinstance(m, CollapseMeter) for m in meter.values()):
        raise ValueError(f"with layers, meter must be None or a dict {{layer: CollapseMeter}} with keys {wanted}, "
                         f"got {type(meter).__name__}" + (f" with keys {sorted(meter)}" if isinstance(meter, Mapping)
                                                           else ""))
    if len({id(m) for m in meter.values()}) != len(wanted):
        raise ValueError("meter must hold a different CollapseMeter for every layer")
    return dict(meter)


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def collect_lm_features(model: Any, batches: Iterable[Any],
                        meter: "CollapseMeter | Mapping[int, CollapseMeter] | None" = None, *, layer: int = -1,
                        layers: Sequence[int] | None = None, ignore_index: int = -100, min_count: int = 1,
                        progress: bool | None = None, total: int | None = None, global_mean: str = "class"
                        ) -> "CollapseMeter | dict[int, CollapseMeter]":
    """Stream a causal LM's hidden states into :class:`~etfkern.collapse.CollapseMeter` (labels = next tokens).

    model: called once per batch as ``model(input_ids=..., attention_mask=..., output_hidden_states=True)`` under
    no_grad; its output has ``hidden_states``, a sequence of L+1 (B, T, d) tensors (the embeddings, then each
    of the L layers, as Hugging Face models return them). Put the model in eval mode first: in train mode dropout
    changes the features (and NC1), so a warning is given.
    batches: dicts (or objects) with ``input_ids`` (B, T), optional ``attention_mask`` (B, T) and optional
    ``labels`` (B, T; default input_ids), or bare (B, T) id tensors; input_ids and attention_mask are moved to the
    model's device (``model.device`` or its first parameter's). The feature at position t is paired with token
    t+1; it is dropped when token t+1 is ``ignore_index`` or either position is padding.
    layer: which hidden state (-1 the last). layers: a sequence of indices instead; every one of them is filled
    from the SAME forward pass and a dict {layer: meter} is returned. An index outside -(L+1)..L raises a
    ValueError naming the model's count (checked against ``model.config.num_hidden_layers`` before any forward
    when the config has it, else on the first batch), before any meter changes.
    meter: accumulate into it (with ``layers``: a dict {layer: meter}); if None, meters are created from
    ``model.config.vocab_size`` and the hidden size on the hidden states' device, with ``global_mean``,
    ``ignore_index`` and ``min_count``.
    progress: a tqdm bar with tokens and tokens/s; None (default) shows it when stderr is a terminal, True always,
    False never. total: the number of batches, for the bar.
    Returns the meter, or {layer: meter} when ``layers`` is given. See docs/metrics.md for what compute() reports.
    """
    from tqdm.auto import tqdm

    from etfkern.collapse import CollapseMeter

    multi = layers is not None
    wanted = _check_layers(layer, layers)
    argname = "layers" if multi else "layer"
    meters = _check_meters(meter, wanted, multi)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    config = _field(model, "config")
    declared = _field(config, "num_hidden_layers") if config is not None else None
    if isinstance(declared, int) and not isinstance(declared, bool):
        _check_layer_range(wanted, declared + 1, argname)
    if getattr(model, "training", False):
        warnings.warn("collect_lm_features: the model is in train mode; dropout changes the hidden states and the "
                      "metrics (NC1 0.93 vs 0.70 on the same data in one test): call model.eval() first",
                      stacklevel=2)
    device = _model_device(model)
    bar = tqdm(batches, total=total, disable=not _progress_enabled(progress), desc="collapse stats", unit="batch")
    tokens = 0
    start = time.perf_counter()
    for batch in bar:
        ids = batch if isinstance(batch, torch.Tensor) else _field(batch, "input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("each batch must carry input_ids of shape (B, T)")
        mask = None if isinstance(batch, torch.Tensor) else _field(batch, "attention_mask")
        labels = None if isinstance(batch, torch.Tensor) else _field(batch, "labels")
        model_ids, model_mask = ids, mask
        if device is not None:  # a CPU data loader feeding a model on the GPU
            model_ids = ids.to(device)
            model_mask = mask.to(device) if isinstance(mask, torch.Tensor) else mask
        with torch.no_grad():
            out = model(input_ids=model_ids, attention_mask=model_mask, output_hidden_states=True)
        hidden = _field(out, "hidden_states")
        if hidden is None:
            raise ValueError("model output has no hidden_states (was output_hidden_states=True honoured?)")
        _check_layer_range(wanted, len(hidden), argname)
        states = {}
        for index in wanted:
            h = hidden[index]
            if h.dim() != 3 or h.shape[:2] != ids.shape:
                raise ValueError(f"hidden_states[{index}] must have shape {tuple(ids.shape) + ('d',)}, "
                                 f"got {tuple(h.shape)}")
            states[index] = h
        if meters is None:
            vocab = _field(config, "vocab_size") if config is not None else None
            if vocab is None:
                raise ValueError("meter is None and model.config.vocab_size is missing: pass a meter")
            meters = {index: CollapseMeter(int(vocab), int(h.shape[-1]), global_mean=global_mean, device=h.device,
                                           ignore_index=ignore_index, min_count=min_count)
                      for index, h in states.items()}
        first = states[wanted[0]]
        target = (labels if labels is not None else ids)[:, 1:].to(first.device)
        keep = target != ignore_index
        if mask is not None:
            m = mask.to(first.device).bool()
            keep &= m[:, 1:] & m[:, :-1]
        target = target[keep]
        feats = {index: h[:, :-1][keep.to(h.device)] for index, h in states.items()}
        # Every layer's batch is checked before any meter changes, so the meters never disagree on what they saw.
        for index, f in feats.items():
            if f.shape[-1] != meters[index].dim:
                raise ValueError(f"hidden_states[{index}] has size {f.shape[-1]}, the meter for layer {index} has "
                                 f"dim={meters[index].dim}")
            if f.numel() and not bool(torch.isfinite(f).all()):
                raise ValueError(f"hidden_states[{index}] contains NaN or inf")
        for index, f in feats.items():
            meters[index].update(f, target.to(f.device))
        tokens += int(target.numel())
        elapsed = time.perf_counter() - start
        bar.set_postfix(tokens=tokens, tok_per_s=f"{tokens / elapsed:.0f}" if elapsed > 0 else "-")
    if meters is None:
        raise ValueError("batches was empty and no meter was given")
    return meters if multi else meters[wanted[0]]
