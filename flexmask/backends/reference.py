"""Reference backend: exact attention in plain PyTorch, chunked over queries.

It evaluates the same lowered ``mask_mod``/``score_mod`` as the flex backend, on broadcast index
tensors, so both backends compute one function. Per chunk of query rows, on CPU:

* ``mask_mod`` gives the chunk's boolean mask, as broadcast as the function makes it (a mask
  that ignores ``b`` and ``h`` stays ``[1, 1, rows, KV]``). Keys that no row of the chunk keeps
  are cut from both ends of the key range, so a causal or sliding-window chunk reads only the keys
  it can see; SDPA given a dense mask computes every key.
* A ``score_mod`` that only *adds* to the score (``score + term(b, h, q, kv)``: every flexmask
  bias lowers to that) is called on a stand-in for the score that records the additions
  (:class:`_ScoreProbe`); the recorded term is the chunk's float bias and the scores are never
  materialised. Anything else done to the score (a softcap's ``tanh``, a product, a replacement)
  makes the probe give up, and that chunk takes the general path: scores materialised,
  ``score_mod`` run on them, softmax.
* Mask and bias go to SDPA's CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) as one float ``attn_mask``. The kernel is
  blocked and fused where a materialised softmax streams ``rows × KV`` scores through memory
  several times, and it accumulates in the input's precision, so float64 stays exact. It is
  called directly, not through ``scaled_dot_product_attention``, whose dispatcher falls back to
  the math path when the mask needs a gradient and whose autograd node would save the mask.

Fully masked rows (no kept key, or every kept key at ``-inf``): the kernel is given one key for
such rows, so no kernel version sees ``0/0``, and their output is replaced by zeros; the gradient
through that replacement is zero, so those rows' gradients are zero and finite.

Autograd: a chunk is one custom function whose backward calls the kernel's backward. The chunk's
mask is not saved but rebuilt in the backward (it is the only ``rows × KV`` tensor; rebuilding is
elementwise, attention is not), so training keeps ``q``, ``k``, ``v``, the output and its
log-sum-exp, never a ``Q × KV`` tensor. A bias that needs a gradient (a learnable table, a per-key
bias) gets ``dS = P ∘ (dP − rowsum(dO ∘ O))`` summed over its broadcast dimensions; the graph from
its captured tensors to the chunk's bias is checkpointed, so it is rebuilt rather than kept. The
general path is checkpointed per chunk as a whole. Second derivatives are not supported.

Off CPU, and under ``torch.compile`` (where the key-range cut and the probe, which branch on
data, would break the graph), every chunk takes the general path with the full key range.

Memory: a chunk has at most ``CHUNK_ELEMENTS`` elements of mask, bias or scores
(``B · Hq · rows · KV``). On the kernel path it also has at most ``CHUNK_ROWS`` rows: smaller
chunks cut more masked keys but pay the mask evaluation and a kernel call per chunk. Computation
runs in float32 (float64 for float64 inputs); the output is in ``q``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .._compat import cpu_flash_attention, cpu_flash_native_gqa

CHUNK_ELEMENTS = 1 << 24
CHUNK_ROWS = 256

_flash, _flash_backward = cpu_flash_attention() or (None, None)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    mask_mod: Callable | None,
    scale: float,
) -> torch.Tensor:
    """Attention ``softmax(mask(score_mod(q kᵀ · scale))) v`` with fully masked rows giving 0."""
    B, Hq, Q, D = q.shape
    Hkv, KV, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Q == 0 or KV == 0:  # nothing to attend: every row is fully masked
        return q.new_zeros(B, Hq, Q, Dv)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    # under torch.compile every chunk takes the general path with no data-dependent branch (no
    # key-range cut, no probe), so dynamo traces it as one graph; off CPU there is no kernel
    tracing = torch.compiler.is_compiling()
    fused = not tracing and _has_kernel(q.device)
    if fused and Hkv != Hq and not _native_gqa():
        kc, vc = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (kc, vc))
    grad = torch.is_grad_enabled()
    rows = max(1, CHUNK_ELEMENTS // max(1, B * Hq * KV))
    if fused:  # smaller chunks cut more masked keys; the general path alone gains nothing from them
        rows = min(rows, CHUNK_ROWS)
    dev = q.device
    ctx = _Context(
        B=B,
        Hq=Hq,
        KV=KV,
        Dv=Dv,
        compute=compute,
        scale=scale,
        tracing=tracing,
        score_mod=score_mod,
        mask_mod=mask_mod,
        b=torch.arange(B, device=dev).view(-1, 1, 1, 1),
        h=torch.arange(Hq, device=dev).view(1, -1, 1, 1),
        kv=torch.arange(KV, device=dev).view(1, 1, 1, -1),
    )
    # the flash kernel wants one head size for q, k and v: zero columns change no dot product
    qf, kf, vf = qc, kc, vc
    if fused and Dv < D:
        vf = F.pad(vc, (0, D - Dv))
    elif fused and Dv > D:
        qf, kf = F.pad(qc, (0, Dv - D)), F.pad(kc, (0, Dv - D))

    outs = []
    for start in range(0, Q, rows):
        stop = min(Q, start + rows)
        plan = ctx.plan(start, stop, grad) if fused else None
        if plan is None or plan.general:
            if grad:
                out = checkpoint(ctx.general, qc[:, :, start:stop], kc, vc, start, stop, use_reentrant=False)
            else:
                out = ctx.general(qc[:, :, start:stop], kc, vc, start, stop)
        else:
            out = ctx.fused(plan, qf[:, :, start:stop], kf, vf, start, stop, grad)[..., :Dv]
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype)


def _has_kernel(device: torch.device) -> bool:
    """Whether the fused path applies: the flash kernel used here is the CPU one (if this torch has it)."""
    return device.type == "cpu" and _flash is not None


_native_gqa = cpu_flash_native_gqa


class _Plan:
    """One chunk: its key range ``[lo, hi)``, mask, bias (``_GENERAL``: not additive), bias grad."""

    __slots__ = ("lo", "hi", "keep", "bias", "bias_grad")

    def __init__(self, lo, hi, keep, bias, bias_grad):
        self.lo, self.hi, self.keep, self.bias, self.bias_grad = lo, hi, keep, bias, bias_grad

    @property
    def general(self) -> bool:
        return self.bias is _GENERAL


class _Context:
    """The call's constants and the per-chunk steps (mask, bias, kernel) that read them."""

    def __init__(self, **kw):
        for name, value in kw.items():  # (not `__dict__.update`: dynamo in torch 2.11 breaks the graph there)
            setattr(self, name, value)

    # -- mask and bias of a chunk ------------------------------------------------------------

    def keep(self, start: int, stop: int) -> torch.Tensor | None:
        """``mask_mod`` on the chunk's index grid: a bool tensor broadcastable to the chunk."""
        if self.mask_mod is None:
            return None
        keep = self.mask_mod(self.b, self.h, self._qi(start, stop), self.kv)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            got = f"a {keep.dtype} tensor" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise TypeError(f"a mask function must return a bool tensor, got {got}")
        self._check_shape("a mask function", keep, stop - start, self.KV)
        return keep

    def bias(self, start: int, stop: int, lo: int, hi: int):
        """The score_mod's additive term on keys ``[lo, hi)`` (a tensor or None), or ``_GENERAL``."""
        if self.score_mod is None:
            return None
        rows = stop - start
        probe = _ScoreProbe(None, (self.B, self.Hq, rows, hi - lo), self.compute, self.kv.device)
        try:
            res = self.score_mod(probe, self.b, self.h, self._qi(start, stop), self.kv[..., lo:hi])
        except (_NotAdditive, TypeError, AttributeError):  # the probe refused: more than an addition
            return _GENERAL
        if not isinstance(res, _ScoreProbe):
            return _GENERAL
        if res.term is None:
            return None
        term = res.term
        if isinstance(term, torch.Tensor):
            term = term.to(device=self.kv.device, dtype=self.compute)
        else:  # only numbers were added
            term = torch.tensor(term, device=self.kv.device, dtype=self.compute)
        self._check_shape("a score_mod", term, rows, hi - lo)
        return term.reshape((1,) * (4 - term.dim()) + tuple(term.shape))

    def plan(self, start: int, stop: int, grad: bool) -> _Plan:
        """The chunk's key range and path; its mask and (detached) bias, for the forward to reuse."""
        with torch.no_grad():
            keep = self.keep(start, stop)
            lo, hi = _key_range(keep, self.KV)
        bias, bias_grad = None, False
        if self.score_mod is not None:
            with torch.set_grad_enabled(grad):  # only to learn whether the term needs a gradient
                bias = self.bias(start, stop, lo, hi)
            if isinstance(bias, torch.Tensor):
                bias_grad = bias.requires_grad
                bias = bias.detach()
        return _Plan(lo, hi, keep, bias, bias_grad)

    def build(self, start: int, stop: int, lo: int, hi: int):
        """The chunk's kernel mask and live rows, from scratch (for the backward, or checkpointed)."""
        with torch.no_grad():
            keep = self.keep(start, stop)
        return self.combine(keep, self.bias(start, stop, lo, hi), lo, hi)

    def combine(self, keep, bias, lo: int, hi: int):
        """The kernel's float mask (or None) and the live rows (None when every row keeps a key).

        A row with no kept key is given key ``lo`` (so the kernel never divides 0 by 0) and is
        marked dead; the caller replaces its output with zeros. Bool reductions and ``where`` run
        element by element on CPU, so the mask is reduced as uint8 and turned into 0/-inf by
        ``1 - 1/x`` (vectorised, and exact: 1 -> 0, 0 -> -inf).
        """
        if keep is not None and keep.shape[-1] != 1:
            keep = keep[..., lo:hi]
        live = None
        mask = None
        if keep is not None:
            u = keep.view(torch.uint8)
            row_min, row_max = torch.aminmax(u, dim=-1, keepdim=True)
            if not bool(row_max.min()):  # a row keeps nothing: give it key lo, zero it later
                live = row_max.bool()
                keep = keep | (~live & _first(hi - lo, keep.device))
                u = keep.view(torch.uint8)
            if live is not None or not bool(row_min.min()):
                mask = torch.reciprocal(u)  # uint8 -> the default float dtype
                mask = (mask if mask.dtype == self.compute else mask.to(self.compute)).neg_().add_(1)
        if bias is None:
            return mask, live
        m = bias if mask is None else bias + mask
        alive = m.detach().amax(-1, keepdim=True) > float("-inf")
        if not bool(alive.all()):  # the score_mod's -inf masked whole rows
            m = torch.where(~alive & _first(hi - lo, m.device), 0.0, m)
            live = alive if live is None else live & alive
        if m.shape[-1] != 1 and m.stride(-1) != 1:
            m = m.contiguous()
        return m, live

    # -- the two paths -----------------------------------------------------------------------

    def fused(self, plan: _Plan, q, k, v, start: int, stop: int, grad: bool) -> torch.Tensor:
        lo, hi = plan.lo, plan.hi
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]
        if not grad or not (q.requires_grad or k.requires_grad or v.requires_grad or plan.bias_grad):
            with torch.no_grad():
                m, live = self.combine(plan.keep, plan.bias, lo, hi)
                out, _ = _flash(q, k, v, attn_mask=m, scale=self.scale)
        else:
            if plan.bias_grad:
                # built again inside a checkpoint: the graph from the captured tensors to this
                # chunk's bias (its saved tensors are rows x KV) is rebuilt in the backward, not kept
                m, live = checkpoint(self.build, start, stop, lo, hi, use_reentrant=False)
            else:
                with torch.no_grad():
                    m, live = self.combine(plan.keep, plan.bias, lo, hi)

            def rebuild():
                with torch.no_grad():
                    return self.build(start, stop, lo, hi)[0]

            out = _Attend.apply(q, k, v, m, self.scale, rebuild)
        plan.keep = plan.bias = None
        return out if live is None else torch.where(live, out, 0.0)

    def general(self, q, k, v, start: int, stop: int) -> torch.Tensor:
        """Materialised scores: for a score_mod that is not a pure addition (e.g. a softcap)."""
        with torch.no_grad():
            keep = self.keep(start, stop)
            lo, hi = (0, self.KV) if self.tracing else _key_range(keep, self.KV)
        if keep is not None and keep.shape[-1] != 1:
            keep = keep[..., lo:hi]
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]
        Hkv = k.shape[1]
        qg = q.unflatten(1, (Hkv, self.Hq // Hkv))  # [B, Hkv, g, rows, D]
        s = (qg @ k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * self.scale
        if self.score_mod is not None:
            s = self.score_mod(s, self.b, self.h, self._qi(start, stop), self.kv[..., lo:hi])
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"a score_mod must return a tensor, got {type(s).__name__}")
            self._check_shape("a score_mod", s, stop - start, hi - lo)
            s = s.to(self.compute).expand(self.B, self.Hq, stop - start, hi - lo)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        live = s.amax(-1, keepdim=True) > float("-inf")
        s = torch.where(live, s, torch.zeros_like(s))
        p = torch.softmax(s, dim=-1)
        p = torch.where(live, p, torch.zeros_like(p))
        return (p.unflatten(1, (Hkv, -1)) @ v.unsqueeze(2)).flatten(1, 2)

    # -- helpers -----------------------------------------------------------------------------

    def _qi(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=self.kv.device).view(1, 1, -1, 1)

    def _check_shape(self, what: str, t: torch.Tensor, rows: int, kv: int) -> None:
        want = (self.B, self.Hq, rows, kv)
        try:
            ok = t.dim() <= 4 and torch.broadcast_shapes(t.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{what} must return a tensor broadcastable to [B, Hq, q_rows, kv] = {list(want)} "
                f"(from index tensors b {list(self.b.shape)}, h {list(self.h.shape)}, "
                f"q_idx [1, 1, {rows}, 1], kv_idx [1, 1, 1, {kv}]), got shape {list(t.shape)}"
            )


_GENERAL = object()  # a chunk's bias() when the score_mod is more than an addition


def _key_range(keep: torch.Tensor | None, KV: int) -> tuple[int, int]:
    """The smallest key range ``[lo, hi)`` holding every kept key of the chunk (at least one key)."""
    if keep is None or keep.shape[-1] == 1:
        return 0, KV
    cols = keep.view(torch.uint8)
    if cols.dim() > 1:
        cols = cols.amax(dim=tuple(range(cols.dim() - 1)))
    cols = cols.nonzero()
    if cols.numel() == 0:
        return 0, 1
    return int(cols[0]), int(cols[-1]) + 1


def _first(n: int, device) -> torch.Tensor:
    """``[n]`` bool, true at 0: the key a fully masked row is given so that no kernel sees 0/0."""
    return torch.arange(n, device=device) == 0


class _ScoreProbe:
    """A stand-in for the scores that records ``score + term`` / ``score - term`` and refuses the rest.

    ``score_mod(probe, ...)`` returning a probe proves the function adds a term that does not depend
    on the score (nothing else was done to the score: any other use raises), so the term is the
    score_mod's bias. Terms are cast to the compute dtype before they are summed, as they would be
    when added to float32/float64 scores.
    """

    def __init__(self, term, shape, dtype, device):
        self.term, self.shape, self.dtype, self.device = term, torch.Size(shape), dtype, device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def _plus(self, other, sign: int) -> _ScoreProbe:
        if isinstance(other, torch.Tensor):
            if other.dtype == torch.bool or other.is_complex():
                raise _NotAdditive(f"score + {other.dtype} tensor")
            other = other.to(self.dtype)
        elif isinstance(other, bool) or not isinstance(other, (int, float)):
            raise _NotAdditive(f"score + {type(other).__name__}")
        if sign < 0:
            other = -other
        return _ScoreProbe(other if self.term is None else self.term + other, self.shape, self.dtype, self.device)

    def __add__(self, other):
        return self._plus(other, 1)

    __radd__ = __add__

    def __sub__(self, other):
        return self._plus(other, -1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if not kwargs and len(args) == 2:
            a, b = args
            if func in _ADDS:
                return a._plus(b, 1) if isinstance(a, cls) else b._plus(a, 1)
            if func in _SUBS and isinstance(a, cls) and not isinstance(b, cls):
                return a._plus(b, -1)
        raise _NotAdditive(getattr(func, "__name__", repr(func)))


_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
_SUBS = (torch.sub, torch.subtract, torch.Tensor.sub, torch.Tensor.__sub__)


class _NotAdditive(Exception):
    """The score_mod did something to the score other than adding a term."""


class _Attend(torch.autograd.Function):
    """The CPU flash kernel on one chunk, keeping its mask out of the saved tensors.

    ``m`` is the chunk's float mask (or None); ``rebuild()`` recomputes its values in the backward.
    When ``m`` needs a gradient it is ``dS = P ∘ (dP − Δ)`` summed to ``m``'s (broadcast) shape.
    """

    @staticmethod
    def forward(ctx, q, k, v, m, scale, rebuild):
        out, lse = _flash(q, k, v, attn_mask=None if m is None else m.detach(), scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.rebuild, ctx.has_mask = scale, rebuild, m is not None
        ctx.m_shape = None if m is None else m.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        m = ctx.rebuild() if ctx.has_mask else None
        dout = dout.contiguous()
        dq = dk = dv = dm = None
        if any(ctx.needs_input_grad[:3]):
            dq, dk, dv = _flash_backward(dout, q, k, v, out, lse, 0.0, False, attn_mask=m, scale=ctx.scale)
        if ctx.needs_input_grad[3]:
            # the chunk's probabilities and dP = dO vᵀ, query heads grouped by the KV head they read
            def grouped(a, b):
                return (a.unflatten(1, (b.shape[1], -1)) @ b.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)

            p = grouped(q, k).mul_(ctx.scale).add_(m).sub_(lse.unsqueeze(-1)).exp_()
            dp = grouped(dout, v)
            delta = (dout * out).sum(-1, keepdim=True)
            dm = p.mul_(dp.sub_(delta)).sum_to_size(ctx.m_shape)
        return dq, dk, dv, dm, None, None
