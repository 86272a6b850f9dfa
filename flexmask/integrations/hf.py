"""flexmask inside existing models: Hugging Face transformers models and plain PyTorch SDPA calls.

Three calls, none of which edits model code:

* :func:`apply` registers flexmask as a transformers attention implementation (``"flexmask"``,
  through ``AttentionInterface`` and ``AttentionMaskInterface``) and switches a model to it. With no
  mask the model keeps its own semantics: causal, its sliding-window layers, padding from
  ``attention_mask``, packed sequences from ``position_ids``, decoding with a KV cache. A given mask
  or bias is added on top, for every layer or per layer (``mask=lambda layer_idx: ...``). Models
  that use Dynamic Mask Attention natively (transformers' Doge) run it through flexmask's ``O(N)``
  top-k (:func:`flexmask.topk`) instead of an ``N × N`` mask.
* :func:`to_dma` converts every attention layer of a Llama/Qwen3-style model to Dynamic Mask
  Attention; :func:`load_dma` loads such a model back after ``save_pretrained``.
* :func:`route_sdpa` (from :mod:`flexmask.integrations.sdpa`, re-exported here) routes
  ``torch.nn.functional.scaled_dot_product_attention`` calls of any PyTorch model through
  :func:`flexmask.attention` with a mask and bias of your choice.

Examples:
    >>> import torch, flexmask as fm
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = fm.hf.apply(LlamaForCausalLM(cfg), mask=lambda i: fm.sliding_window(4) if i % 2 else None)
    >>> model(torch.randint(0, 64, (1, 10))).logits.shape
    torch.Size([1, 10, 64])
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import attn_implementation, closure, mark_static_address, masking_utils, transformers_version
from ..algebra.bias import Bias, key_bias
from ..algebra.masks import KeyMask, Mask, causal, document, sliding_window
from ..algebra.masks import mask as function_mask
from ..dma import DMAConfig, dynamic_bias
from ..functional import attention
from ..settings import Backend
from .sdpa import route_sdpa

NAME = "flexmask"
"""The attention implementation name registered in transformers (``attn_implementation="flexmask"``)."""

LayerMask = Mask | Callable[[int], Mask | None] | None
LayerBias = Bias | Callable[[int], Bias | None] | None


# ---------------------------------------------------------------------------------------------
# what a transformers model asks for: its mask, in flexmask's terms


class ModelMask:
    """The mask a transformers model asked for in one forward, as a flexmask mask.

    The ``"flexmask"`` mask interface returns one of these in place of the ``[B, 1, Q, KV]`` tensor
    other implementations build; the model hands it, untouched, to the attention function.

    Attributes:
        mask: the flexmask mask (``None``: attend everywhere), in flexmask positions: keys ``0..KV-1``
            as the cache holds them, queries the last ``Q`` of them.
        valid: ``[B, KV]`` bool keys that exist (from the 2-D ``attention_mask``), or ``None``.
        documents: ``[B, KV]`` packed-sequence ids (from ``position_ids``), or ``None``.
        window: the model's sliding window for this mask, or ``None``.
        structured: whether ``mask`` was rebuilt from flexmask's structured masks (``causal``,
            ``sliding_window``, ``document``) or wraps transformers' mask function (under
            ``torch.compile`` and for patterns flexmask does not recognise).
        aligned: whether the queries are the last positions of the keys (false for a static
            cache, whose empty slots follow them).
        q_start: where the queries start among the keys when they are not the last ones (a static
            cache): a one-element tensor for one decoding query whose position transformers gives
            as a tensor (no host sync, and a compiled decoding step does not recompile per token),
            else an int eagerly, or ``None`` (several queries under ``torch.compile``); the attention
            passes it on as ``q_offset``, and ``mask`` is then in those absolute positions.

    ``generate`` with a static cache builds the mask ahead and hands it to the model as an
    "already prepared" mask: ``ndim``/``contiguous`` let it pass, and the mask interface returns it.
    """

    ndim = 4

    def contiguous(self) -> ModelMask:
        return self

    def __init__(
        self,
        mask: Mask | None,
        q_length: int,
        kv_length: int,
        *,
        valid: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        window: int | None = None,
        structured: bool = True,
        aligned: bool = True,
        q_start: int | None = None,
        probe: Callable[[], torch.Tensor | None] | None = None,
    ):
        self.mask, self.q_length, self.kv_length = mask, q_length, kv_length
        self.valid, self.documents, self.window = valid, documents, window
        self.structured, self.aligned, self.q_start = structured, aligned, q_start
        self._probe = probe
        self._combined: dict[int, tuple[Any, Mask | None]] = {}

    def combined(self, extra: Mask | None) -> Mask | None:
        """``self.mask & extra``, one object per ``extra`` so that layers share one ``BlockMask``."""
        if extra is None:
            return self.mask
        if id(extra) not in self._combined:
            self._combined[id(extra)] = (extra, extra if self.mask is None else self.mask & extra)
        return self._combined[id(extra)][1]

    def candidates(self) -> Mask | None:
        """The keys that compete in a DMA top-k: those of the query's packed sequence (``fm.document``)
        that are not padding (``fm.key_mask`` of the padding mask's own tensor: the model's
        ``KeyMask(valid)`` then adds nothing beside the top-k, which plans alone), or ``None``."""
        documents = self.documents
        if documents is None and self._probe is not None:
            documents = self._probe()
        parts = [document(documents)] if documents is not None else []
        if self.valid is not None:
            parts.append(KeyMask(self.valid))
        return None if not parts else parts[0] if len(parts) == 1 else parts[0] & parts[1]

    def __repr__(self) -> str:
        return f"ModelMask({self.mask!r}, q_length={self.q_length}, kv_length={self.kv_length})"


def model_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> ModelMask:
    """The ``AttentionMaskInterface`` entry of ``"flexmask"``: transformers' mask request as a :class:`ModelMask`.

    transformers calls it from ``create_causal_mask`` (and the sliding-window, chunked and
    bidirectional variants) with the mask function it composed (causal, sliding overlay, packed
    sequences, ...), the 2-D padding ``attention_mask`` ``[B, seen + Q]`` and the query/key offsets
    of the cache. Outside ``torch.compile`` the function is recognised and rebuilt from flexmask's
    structured masks (cheap ``BlockMask``); under compile, or for patterns it does not know, it is
    wrapped as it is (``fm.mask``), which is always exact.
    """
    if isinstance(attention_mask, ModelMask):  # prepared ahead by generate (static cache)
        return attention_mask
    if mask_function is None:
        mask_function = masking_utils().causal_mask_function
    compiling = torch.compiler.is_compiling()

    valid = None
    if attention_mask is not None:
        valid = _key_slice(attention_mask.to(device=device), kv_offset, kv_length)
        # no padding: drop the key mask. A static cache's empty slots are padding, so decoding with one
        # needs no look at the mask (which would synchronise with the device every token)
        fills = attention_mask.shape[-1] >= kv_offset + kv_length
        if fills and not compiling and bool(valid.all()):
            valid = None

    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset - kv_offset == kv_length - q_length
    q_start = None
    if not aligned and isinstance(kv_offset, int):
        # a static cache: the queries sit before its empty slots, and masks and DMA's selection must
        # see where they are. One decoding query keeps its position a tensor (flexmask attends to it
        # without reading it), also eagerly: generate() prepares this mask outside its compiled
        # decoding step, which would otherwise see a new int each token and recompile (or re-record
        # its CUDA graph). Several queries eagerly: their position is read (one host sync).
        if q_length == 1 and isinstance(q_offset, torch.Tensor):
            q_start = (q_offset - kv_offset).reshape(1)
        elif not compiling:
            start = int(q_offset) - kv_offset
            if 0 <= start <= kv_length - q_length:
                q_start = start
    known = aligned or q_start is not None
    parts = _recognize(mask_function, shallow=compiling) if known else None
    if parts is not None and (parts["documents"] is None or (q_offset == 0 and q_length == kv_length)):
        base = sliding_window(parts["window"]) if parts["window"] is not None else causal() if parts["causal"] else None
        if parts["keys"] is not None:  # a padding function inside the mask function (not transformers' usual way)
            base = _and(base, KeyMask(_key_slice(parts["keys"], kv_offset, kv_length)))
        documents = None if parts["documents"] is None else parts["documents"].expand(batch_size, -1)
        if documents is not None:
            base = _and(base, document(documents))
        return ModelMask(
            _and(base, None if valid is None else KeyMask(valid)),
            q_length,
            kv_length,
            valid=valid,
            documents=documents,
            window=parts["window"],
            aligned=aligned,
            q_start=q_start,
        )

    # Generic: transformers' own function, moved to flexmask positions (queries are the last ones,
    # or start at q_start).
    shift_q = kv_offset if q_start is not None else q_offset - (kv_length - q_length)
    fn = mask_function

    def transformers_mask(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + shift_q, kv_idx + kv_offset)

    # Under compile the closures can't be read, so DMA finds packed sequences by probing the function
    # (transformers only packs without padding and without a cache).
    maybe_packed = compiling and attention_mask is None and isinstance(q_offset, int) and q_offset == kv_offset == 0
    probe = (lambda: _probe_documents(fn, batch_size, kv_length, device)) if maybe_packed else None
    return ModelMask(
        _and(function_mask(transformers_mask, name="transformers"), None if valid is None else KeyMask(valid)),
        q_length,
        kv_length,
        valid=valid,
        window=local_size,
        structured=False,
        aligned=aligned,
        probe=probe,
        q_start=q_start,
    )


def _key_slice(padding: torch.Tensor, kv_offset: int, kv_length: int) -> torch.Tensor:
    """``[B, kv_length]`` bool slice of a 2-D padding mask; keys past its end (empty static-cache slots) are padding."""
    padding = padding.to(torch.bool)
    missing = kv_offset + kv_length - padding.shape[-1]
    if missing > 0:
        padding = F.pad(padding, (0, missing), value=False)
    return padding[:, kv_offset : kv_offset + kv_length]


def _and(a: Mask | None, b: Mask | None) -> Mask | None:
    return b if a is None else a if b is None else a & b


def _recognize(fn: Callable, shallow: bool = False) -> dict[str, Any] | None:
    """Read a transformers mask function: ``{"causal", "window", "documents", "keys"}``, or ``None``.

    ``shallow`` (under ``torch.compile``, where dynamo cannot read closures) knows only the plain
    causal and bidirectional functions.

    Knows the pieces ``masking_utils`` composes (``causal_mask_function``, ``bidirectional_mask_function``,
    ``sliding_window_overlay``, ``packed_sequence_mask_function``, ``remap_positions_for_packed_sequence``,
    ``padding_mask_function``, joined by ``and_masks``); anything else (user overlays, chunked,
    bidirectional windows, block overlays) returns ``None`` and the caller wraps the function as is.
    """
    mu = masking_utils()
    parts: dict[str, Any] = {
        "causal": False,
        "full": False,
        "window": None,
        "documents": None,
        "keys": None,
        "remapped": False,
    }

    if not _visit(fn, parts, mu, shallow):
        return None
    if parts["remapped"] and parts["documents"] is None:
        return None
    if parts["full"] and (parts["causal"] or parts["window"] is not None):
        return None
    if parts["window"] is not None and not parts["causal"]:
        return None  # a bidirectional window: not a flexmask primitive
    return parts


def _visit(f: Callable, parts: dict[str, Any], mu: types.ModuleType, shallow: bool) -> bool:
    # a module-level function: a recursive closure would be a reference cycle holding the tensors in `parts`
    if f is mu.causal_mask_function:
        parts["causal"] = True
        return True
    if f is mu.bidirectional_mask_function:
        parts["full"] = True
        return True
    name = getattr(f, "__qualname__", "")
    if shallow or not name.endswith("<locals>.and_mask") and not name.endswith("<locals>.inner_mask"):
        return False
    cells = closure(f)
    owner = name.split(".<locals>")[0]
    if owner == "and_masks":
        return all(_visit(g, parts, mu, shallow) for g in cells["mask_functions"])
    if owner == "sliding_window_overlay" and parts["window"] is None:
        parts["window"] = int(cells["sliding_window"])
        return True
    if owner == "packed_sequence_mask_function" and parts["documents"] is None:
        parts["documents"] = cells["packed_sequence_mask"]
        return True
    if owner == "padding_mask_function" and parts["keys"] is None:
        parts["keys"] = cells["padding_mask"]
        return True
    if owner == "remap_positions_for_packed_sequence":
        # Positions restart per packed sequence and step by one inside it, so a mask of the
        # position difference (causal, sliding window) is unchanged once documents are kept apart.
        parts["remapped"] = True
        return _visit(cells["mask_function"], parts, mu, shallow)
    return False


def _probe_documents(fn: Callable, batch: int, length: int, device) -> torch.Tensor | None:
    """Packed-sequence ids of a causal/sliding transformers mask: a new sequence where ``i`` can't see ``i - 1``."""
    if length < 2:
        return None
    i = torch.arange(1, length, device=device)[None, :]
    b = torch.arange(batch, device=device)[:, None]
    same = torch.as_tensor(fn(b, torch.zeros_like(b), i, i - 1), device=device).expand(batch, length - 1)
    return F.pad(torch.cumsum(~same, -1), (1, 0))


# ---------------------------------------------------------------------------------------------
# the attention function


@dataclass
class _LayerSpec:
    mask: Mask | None
    bias: Bias | None
    dma: DMAConfig | None
    backend: Backend
    sharding: Any = None  # a flexmask.distributed.SequenceSharding: this layer runs context-parallel


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: ModelMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry of ``"flexmask"``.

    Args:
        module: the attention module; :func:`apply` stores its layer's mask, bias and DMA settings on it.
        query: ``[B, Hq, Q, D]``; the last ``Q`` positions of the ``KV`` keys.
        key: ``[B, Hkv, KV, D]`` (after the cache update).
        value: ``[B, Hkv, KV, Dv]``.
        attention_mask: the :class:`ModelMask` from the ``"flexmask"`` mask interface, or ``None``
            (then causal unless ``module.is_causal`` is false).
        scaling: score scale.
        dropout: must be 0 (flexmask has no attention dropout).
        **kwargs: ``softcap`` is honoured; ``position_bias`` and ``s_aux`` (sinks) raise; the rest
            (``position_ids``, ``sliding_window``, ...) is already in the mask.

    Returns:
        ``([B, Q, Hq, Dv], None)``, as transformers' attention functions.
    """
    if dropout:
        raise ValueError(
            f"flexmask has no attention dropout, got dropout={dropout}; set config.attention_dropout = 0.0"
        )
    for name in ("position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flexmask's transformers attention does not support `{name}`")
    spec: _LayerSpec | None = getattr(module, "_flexmask", None)
    if isinstance(attention_mask, _DogeMask):
        attention_mask = attention_mask.model_mask
    if attention_mask is None:
        attention_mask = ModelMask(
            causal() if getattr(module, "is_causal", True) else None, query.shape[2], key.shape[2]
        )
    elif not isinstance(attention_mask, ModelMask):
        raise TypeError(
            "the flexmask attention needs the mask built by its own mask interface, got "
            f"{type(attention_mask).__name__} (transformers {transformers_version()}); pass a 2-D "
            "attention_mask (padding), not a prepared 4-D mask, or express the pattern with apply(model, mask=...)"
        )
    if attention_mask.kv_length != key.shape[2] or attention_mask.q_length != query.shape[2]:
        raise ValueError(
            f"the model's mask was made for q_len={attention_mask.q_length}, kv_len={attention_mask.kv_length}, "
            f"but attention got q {tuple(query.shape)} and k {tuple(key.shape)}"
        )
    if spec is not None and spec.sharding is not None:
        return _context_parallel(module, spec, query, key, value, attention_mask, scaling, kwargs.get("softcap"))
    mask = attention_mask.combined(None if spec is None else spec.mask)
    bias = None if spec is None else spec.bias
    if spec is not None and spec.dma is not None:
        layer = _cache_layer(kwargs.get(CACHE_KWARG), module.layer_idx)
        scores = _key_scores(module, spec.dma, value, attention_mask, layer)  # [B, Hb, KV]
        bias = _with_key_bias(bias, scores, query.dtype)
        mask = _and(mask, _dma_selection(scores, spec.dma, attention_mask, layer))
    out = attention(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        scale=scaling,
        softcap=kwargs.get("softcap"),
        backend="auto" if spec is None else spec.backend,
        q_offset=attention_mask.q_start,
    )
    return out.transpose(1, 2).contiguous(), None


def _with_key_bias(bias: Bias | None, scores: torch.Tensor, dtype: torch.dtype) -> Bias:
    """``bias`` plus DMA's key bias of ``scores`` (in the attention's dtype)."""
    dyn = key_bias(scores.to(dtype))
    return dyn if bias is None else bias + dyn


def _key_scores(module, config: DMAConfig, value: torch.Tensor, model: ModelMask, layer: Any) -> torch.Tensor:
    """DMA's per-key scores ``[B, Hb, KV]`` of the keys this call attends to (``layer``: the
    module's layer of the KV cache, :func:`_cache_layer`, or ``None``).

    Each key's score depends on its value state only. Beside a static KV cache (a preallocated
    transformers cache layer, as ``generate`` makes for ``cache_implementation="static"``), outside
    autograd, the scores are kept on the cache layer and only the keys this call writes are scored:
    a decoding step reads ``KV`` floats per head instead of all cached values. The kept scores are
    tied to the value tensor they were computed from (its identity): when the cache's tensors are
    replaced (beam search reorders them, batches are repeated or selected) they are computed anew
    from all value states, as they are for every other cache and without one.
    """
    if (
        layer is None
        or torch.is_grad_enabled()
        or not getattr(layer, "is_compileable", False)
        or getattr(layer, "is_sliding", True)  # a rolling buffer moves its keys
        or getattr(layer, "values", None) is not value
    ):
        return _value_scores(module, config, value)
    new = _written_positions(model, value.device)
    kept = getattr(layer, _SCORES, None)
    if new is None or kept is None or kept[0] is not value:
        scores = _value_scores(module, config, value)
        mark_static_address(scores)  # written in place by compiled decoding steps (CUDA graphs)
        setattr(layer, _SCORES, (value, scores))
        return scores
    scores = kept[1]
    scores.index_copy_(-1, new, _value_scores(module, config, value.index_select(2, new)).to(scores.dtype))
    return scores


def _value_scores(module, config: DMAConfig, value: torch.Tensor) -> torch.Tensor:
    """DMA's score of each key from its value state: ``[B, Hb, N]`` for ``value`` ``[B, Hkv, N, D]``."""
    return dynamic_bias(value, module.dt_proj, module.A, config.bias_form)


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    """Layer ``layer_idx`` of a transformers KV cache, or ``None`` (no cache, or one without such a layer)."""
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if isinstance(layers, list | tuple) and layer_idx < len(layers) else None


CACHE_KWARG = "flexmask_cache"
"""The keyword under which a DMA attention module hands its KV cache to the attention function."""
_SCORES = "flexmask_scores"  # the attribute of a static cache layer holding (value states, their scores)
_KEPT = "flexmask_kept"  # ... and (those scores, the last query's kept keys) for token selection


def _written_positions(model: ModelMask, device: torch.device) -> torch.Tensor | None:
    """The cache positions of this call's keys (those of its queries), ``[Q]`` int64, or ``None`` if unknown."""
    q, kv, start = model.q_length, model.kv_length, model.q_start
    if isinstance(start, torch.Tensor):
        return start.to(device=device, dtype=torch.long).reshape(1) if q == 1 else None
    if start is not None:
        return torch.arange(start, start + q, device=device)
    return torch.arange(kv - q, kv, device=device) if model.aligned else None


def _hand_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a DMA attention module: passes the module's KV cache (``cache=``, or
    ``past_key_values=`` before transformers renamed it) on to the attention function, which
    transformers' attention modules call with their remaining keyword arguments. Under another
    attention implementation it forgets the layer's kept scores instead: that step writes keys
    without them."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return None
    if attn_implementation(module) != NAME:  # another implementation writes keys without their scores
        layer = _cache_layer(cache, module.layer_idx)
        for held in (_SCORES, _KEPT):
            if getattr(layer, held, None) is not None:
                setattr(layer, held, None)
        return None
    return args, {**kwargs, CACHE_KWARG: cache}


def _context_parallel(module, spec: _LayerSpec, query, key, value, model: ModelMask | None, scaling, softcap):
    """One layer of a model whose sequences are split over ranks (``sequence_sharding=``): this rank's
    shard through :func:`flexmask.distributed.attention`, causal (with the layer's sliding window)
    over whole sequences, the layer's mask and bias, and DMA's selection from this rank's scores."""
    from ..distributed import attention as sharded_attention

    if model is not None and (model.valid is not None or not model.aligned):
        raise NotImplementedError(
            "context parallelism (sequence_sharding=) takes whole sequences without padding and without a KV "
            "cache: pack sequences (fm.document) instead of padding them"
        )
    window = getattr(module, "sliding_window", None)
    mask = sliding_window(window) if isinstance(window, int) and window > 0 else causal()
    if spec.mask is not None:
        mask = mask & spec.mask
    bias = spec.bias
    if spec.dma is not None:
        scores = _value_scores(module, spec.dma, value)  # this rank's keys
        bias = _with_key_bias(bias, scores, query.dtype)
        mask = mask & spec.dma.content_mask(scores)
    out = sharded_attention(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        scale=scaling,
        softcap=softcap,
        group=spec.sharding.group,
        layout=spec.sharding.layout,
    )
    return out.transpose(1, 2).contiguous(), None


def _dma_selection(scores: torch.Tensor, config: DMAConfig, model: ModelMask, layer: Any = None) -> Mask | None:
    """The top-``keep_window`` selection of DMA given the model's mask, or ``None`` when it keeps
    everything. Beside a static cache layer that keeps the scores, token selection also keeps the
    last query's kept keys there (:func:`_kept_keys`)."""
    keep_window = config.keep_window
    if not model.aligned and model.q_start is None:
        raise NotImplementedError(
            "DMA with a static cache over several queries under torch.compile (a compiled prefill) is not "
            "supported; prefill eagerly (transformers does), or use the default dynamic cache"
        )
    if scores.shape[-1] <= keep_window:
        return None  # every candidate is kept
    if model.window is not None:
        if model.window <= keep_window:
            return None  # the window holds at most keep_window keys: top-k keeps them all
        raise NotImplementedError(f"DMA top-{keep_window} inside a sliding window of {model.window} is not supported")
    selection = config.content_mask(scores, among=model.candidates())
    held = getattr(layer, _SCORES, None)
    if config.selection != "token" or held is None or held[1] is not scores:
        return selection
    kept = _kept_keys(layer, selection, model)
    return selection if model.q_length > 1 else config.content_mask(scores, among=selection.among, kept=kept)


def _kept_keys(layer: Any, selection: Any, model: ModelMask) -> torch.Tensor:
    """The keys the call's last query keeps, held on the static cache ``layer`` beside the scores
    (``[B, Hb, keep_window]``, written in place: the same buffer in every step of a CUDA graph).

    A decoding step's query finds its kept keys from those of the query before it, in
    ``O(keep_window)`` (``fm.topk(...).keep`` with ``previous=``): the static cache writes each
    call's keys after the ones it holds, so steps follow each other position by position. A call
    over several queries (a prefill) selects over every key instead, and so does any call whose
    scores are new (a cache replaced or reordered, held scores dropped).
    """
    q, start = model.q_length, model.q_start
    if isinstance(start, torch.Tensor):
        query = start.reshape(-1)[:1] + (q - 1)
    else:
        query = (model.kv_length - q if start is None else start) + q - 1
    held = getattr(layer, _KEPT, None)
    if held is not None and held[0] is not selection.scores:  # kept for other scores
        held = None
    if q == 1 and held is not None:
        kept = selection.keep(query, previous=held[1])
    else:
        kept = selection.keep(query)
        if held is None or held[1].shape != kept.shape:
            mark_static_address(kept)  # written in place by compiled decoding steps (CUDA graphs)
            setattr(layer, _KEPT, (selection.scores, kept))
            return kept
    held[1].copy_(kept)
    return held[1]


# ---------------------------------------------------------------------------------------------
# apply / to_dma / load_dma


def register() -> None:
    """Register ``"flexmask"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    After this, ``from_pretrained(..., attn_implementation="flexmask")`` and
    ``model.set_attn_implementation("flexmask")`` work (no extra mask or bias; use :func:`apply` for those).
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    masking_utils()
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, model_mask)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers model: those with an int ``layer_idx`` and ``num_key_value_groups``."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups")
    ]


def _is_doge(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("dt_proj", "A", "keep_window_size", "prepare_dynamic_mask"))


def apply(
    model: nn.Module,
    mask: LayerMask = None,
    bias: LayerBias = None,
    *,
    backend: Backend = "auto",
    sequence_sharding: Any = None,
) -> nn.Module:
    """Run a transformers model's attention through :func:`flexmask.attention`.

    Registers ``"flexmask"`` (:func:`register`), stores each layer's mask and bias on its attention
    module and calls ``model.set_attn_implementation("flexmask")``. With ``mask=None`` and
    ``bias=None`` the logits match SDPA's (causal, sliding-window layers, padding, packed
    sequences, KV cache). Models with Dynamic Mask Attention (transformers' Doge, or after
    :func:`to_dma`) compute their top-``keep_window`` keys with :func:`flexmask.topk` and add the
    dynamic bias with :func:`flexmask.key_bias`.

    Args:
        model: a transformers model using the attention interface (Llama, Qwen3, Mistral, Doge, ...).
        mask: a flexmask mask intersected with the model's own (causal, padding, ...), or a
            function ``layer_idx -> mask or None`` for per-layer patterns.
        bias: a flexmask bias added to the scores, or a function ``layer_idx -> bias or None``.
            Learnable tables inside it are not registered on the model: hand them to the optimizer.
        backend: :func:`flexmask.attention`'s backend (``"auto"``: flex on CUDA, reference elsewhere).
        sequence_sharding: a :class:`flexmask.distributed.SequenceSharding`: every rank of its group
            feeds the model its shard of each sequence (token ids and *global* ``position_ids``, in the
            sharding's layout) and every attention layer runs
            :func:`flexmask.distributed.attention` over the whole sequences (context parallelism);
            causal with the layer's sliding window, no padding, no KV cache. ``None``: one device.

    Returns:
        The same model, switched to ``"flexmask"`` (``model.set_attn_implementation("sdpa")`` goes back).

    Examples:
        >>> import torch, flexmask as fm
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = fm.hf.apply(LlamaForCausalLM(cfg), mask=fm.sliding_window(8))
        >>> model.config._attn_implementation
        'flexmask'
    """
    register()
    layers = attention_layers(model)
    if (mask is not None or bias is not None) and not layers:
        raise ValueError(f"found no attention layers (modules with `layer_idx`) in {type(model).__name__}")
    settings = getattr(getattr(model, "config", None), "flexmask_dma", None)
    for module in layers:
        idx = module.layer_idx
        layer_mask = mask(idx) if callable(mask) else mask
        layer_bias = bias(idx) if callable(bias) else bias
        if layer_mask is not None and not isinstance(layer_mask, Mask):
            raise TypeError(f"mask for layer {idx} must be a flexmask mask, got {type(layer_mask).__name__}")
        if layer_bias is not None and not isinstance(layer_bias, Bias):
            raise TypeError(f"bias for layer {idx} must be a flexmask bias, got {type(layer_bias).__name__}")
        dma = None
        if _is_doge(module):
            dma = DMAConfig(keep_window=int(module.keep_window_size), bias_form="exp", bias_heads="kv")
            module.prepare_dynamic_mask = types.MethodType(_doge_prepare_dynamic_mask, module)
        elif settings is not None and hasattr(module, "dt_proj"):
            dma = DMAConfig(**settings)
        module._flexmask = _LayerSpec(layer_mask, layer_bias, dma, backend, sequence_sharding)
        handle = getattr(module, "_flexmask_hook", None)
        if handle is not None:
            handle.remove()
        module._flexmask_hook = None if dma is None else module.register_forward_pre_hook(_hand_cache, with_kwargs=True)
    model.set_attn_implementation(NAME)
    if attn_implementation(model) != NAME:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation to {NAME!r}")
    return model


class _DogeMask:
    """What Doge's ``prepare_dynamic_mask`` returns under ``"flexmask"``: the model's :class:`ModelMask`, untouched.

    Doge's own ``forward`` runs as transformers wrote it (projections, norms, rotary embedding, the
    cache update under whatever keyword the installed version uses); only its ``N × N`` dynamic
    mask is replaced. The forward passes that mask through ``repeat_kv`` (``shape``, indexing,
    ``expand``, ``reshape``) to the attention function, so this object answers those and stays itself;
    :func:`attention_forward` then computes the top-``keep_window`` selection in ``O(N)``.
    """

    def __init__(self, model_mask: ModelMask | None, heads: int, q_len: int, kv_len: int):
        self.model_mask = model_mask
        self.shape = torch.Size((1, heads, q_len, kv_len))

    def __getitem__(self, index: Any) -> _DogeMask:
        return self

    def expand(self, *sizes: Any) -> _DogeMask:
        return self

    def reshape(self, *sizes: Any) -> _DogeMask:
        return self


def _doge_prepare_dynamic_mask(
    self: nn.Module,
    hidden_states: torch.Tensor,
    dt_states: torch.Tensor,
    keep_window_size: int = 2048,
    attention_mask: Any = None,
) -> Any:
    """``DogeAttention.prepare_dynamic_mask`` under ``"flexmask"``: no ``N × N`` mask (see :class:`_DogeMask`).

    Under any other attention implementation (after ``set_attn_implementation("eager")``, say) it is
    transformers' own method.
    """
    if attn_implementation(self) != NAME:
        return type(self).prepare_dynamic_mask(self, hidden_states, dt_states, keep_window_size, attention_mask)
    return _DogeMask(attention_mask, dt_states.shape[1], hidden_states.shape[1], dt_states.shape[-1])


def to_dma(
    model: nn.Module,
    keep_window: int,
    *,
    bias_form: Literal["exp", "linear"] = "exp",
    bias_heads: Literal["kv", "q"] = "kv",
    selection: Literal["token", "block"] = "token",
    block_size: int = 128,
    mask: LayerMask = None,
    bias: LayerBias = None,
    backend: Backend = "auto",
    sequence_sharding: Any = None,
) -> nn.Module:
    """Convert every attention layer of a Llama/Qwen3-style model to Dynamic Mask Attention.

    Each attention module gets ``dt_proj`` (``Linear(Hkv·D, Hb)``, ``Hb`` = KV heads or query heads)
    and ``A`` (``[Hb]``, zero). Per layer, the dynamic bias ``exp(A · softplus(dt_proj(v)))`` (or
    ``A · softplus(...)``) scores each key; query ``i`` keeps the ``keep_window`` best keys ``j <= i``
    within its sequence and adds their scores to the logits. With ``A = 0`` the bias is constant:
    the model is unchanged while the sequence fits the window, and it is sliding-window attention
    of ``keep_window`` keys beyond. The settings go to ``model.config.flexmask_dma`` so that
    ``save_pretrained`` keeps them; load with :func:`load_dma`. Then :func:`apply` switches the model.

    Args:
        model: a transformers decoder using the attention interface.
        keep_window: keys kept per query (``w``).
        bias_form: ``"exp"`` (paper, Doge) or ``"linear"``.
        bias_heads: ``"kv"`` (one score per KV head, as Doge) or ``"q"``.
        selection: ``"token"`` (:func:`flexmask.topk`: the best keys) or ``"block"``
            (:func:`flexmask.topk_blocks`: the best ``keep_window // block_size`` key blocks by their
            best key, plus the diagonal block).
        block_size: key block length for ``"block"`` selection.
        mask: as in :func:`apply`.
        bias: as in :func:`apply`.
        backend: as in :func:`apply`.
        sequence_sharding: as in :func:`apply` (context parallelism: the selection needs every key's
            score, so the scores are gathered from the ranks).

    Returns:
        The same model, converted and switched to ``"flexmask"``.

    Examples:
        >>> import torch, flexmask as fm
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = fm.hf.to_dma(LlamaForCausalLM(cfg), keep_window=8)
        >>> model.model.layers[0].self_attn.A
        Parameter containing:
        tensor([0., 0.], requires_grad=True)
    """
    config = DMAConfig(keep_window, bias_form, bias_heads, selection, block_size)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"found no attention layers (modules with `layer_idx`) in {type(model).__name__}")
    for module in layers:
        if _is_doge(module):
            raise ValueError("this model already uses DMA (Doge); use flexmask.hf.apply(model)")
        head_dim = module.head_dim
        kv_heads = module.k_proj.out_features // head_dim
        q_heads = module.q_proj.out_features // head_dim
        heads = kv_heads if bias_heads == "kv" else q_heads
        weight = module.k_proj.weight
        module.dt_proj = nn.Linear(kv_heads * head_dim, heads, device=weight.device, dtype=weight.dtype)
        module.A = nn.Parameter(torch.zeros(heads, device=weight.device, dtype=weight.dtype))
    settings = config.as_dict()
    if selection == "token":  # (configs saved before block selection existed have no such keys)
        del settings["selection"], settings["block_size"]
    model.config.flexmask_dma = settings
    return apply(model, mask, bias, backend=backend, sequence_sharding=sequence_sharding)


def load_dma(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` for a model saved after :func:`to_dma`: rebuilds its DMA and loads ``dt_proj``/``A``.

    transformers builds the plain model (and leaves the DMA tensors of the checkpoint unused);
    this converts it with the saved ``config.flexmask_dma`` and loads those tensors from the
    checkpoint's safetensors files.

    Args:
        model_class: e.g. ``LlamaForCausalLM`` or ``AutoModelForCausalLM``.
        path: the ``save_pretrained`` directory.
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``device_map``, ...).

    Returns:
        The converted model, switched to ``"flexmask"``.
    """
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the DMA tensors are reported as unexpected; they are loaded below
    try:
        model = model_class.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    settings = getattr(model.config, "flexmask_dma", None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path} has no `flexmask_dma` in its config: it was not saved after flexmask.hf.to_dma")
    to_dma(model, **settings)
    wanted = {name for name in model.state_dict() if name.endswith((".dt_proj.weight", ".dt_proj.bias", ".A"))}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({file for name, file in json.load(f)["weight_map"].items() if name in wanted})
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({k: v for k, v in load_file(os.path.join(path, file)).items() if k in wanted})
    if wanted - state.keys():
        raise ValueError(f"the checkpoint at {path} lacks DMA tensors: {sorted(wanted - state.keys())[:4]}")
    model.load_state_dict(state, strict=False)
    return model


__all__ = [
    "NAME",
    "KeyMask",
    "ModelMask",
    "apply",
    "attention_forward",
    "attention_layers",
    "load_dma",
    "model_mask",
    "register",
    "route_sdpa",
    "to_dma",
]
