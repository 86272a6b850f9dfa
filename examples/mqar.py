"""Multi-query associative recall (MQAR): can trainable Dynamic Mask Attention find what a window cannot see?

The task (Zoology-style, as in the DMA paper, arXiv 2508.02124). The vocabulary is split into
*keys*, *values* and *filler* tokens. A sequence of length ``N`` starts with ``num_pairs`` key-value
pairs ``k1 v1 k2 v2 ...`` (distinct keys, random values), followed by random filler tokens. In the
last quarter (from ``query_start = 3N/4`` on) every key of the pairs appears once more, at a
random position and in random order: a *query*. The target at a query position is the value that
was paired with that key; every other position has target ``-100`` (no loss). Filler tokens have
their own range of the vocabulary (Zoology draws its noise from the whole vocabulary), so a key
never appears as noise and the pairs are recognisable by their content — what a content-based
selection such as DMA's is meant to learn.

Every query is more than ``layers · (w - 1 + short_conv - 1)`` positions after its pair (checked),
so a stack of sliding windows of ``w`` keys cannot carry the pair to its query, not even through a
chain of layers and convolutions: the sliding-window model can only guess (chance is
``1 / num_values``). Full causal attention can solve it (an induction circuit: the short
convolution or layer 1 puts each key onto its value's position, layer 2 matches the query's key
there). DMA keeps only ``w`` keys per query, like the window, but chooses them by a learned per-key
content score computed from the value states (``A`` starts at zero, where DMA *is* the sliding
window), so it solves the task only if it learns to rank the pair positions into each query's
top ``w``.

Four identical tiny models (``layers`` pre-norm blocks: RMSNorm, a short depthwise causal
convolution, attention with rotary positions, RMSNorm, GELU MLP), differing only in their
attention, all through flexmask:

* ``mha``: ``fm.attention(q, k, v, mask=fm.causal())``;
* ``swa``: ``mask=fm.causal() & fm.sliding_window(w)``;
* ``dma-token``: ``fm.DynamicMaskAttention(..., keep_window=w, selection="token")``;
* ``dma-block``: ``fm.DynamicMaskAttention(..., keep_window=w, selection="block", block_size=bs)``,
  which keeps ``w // bs`` past key blocks plus the query's own block.

The non-DMA layers have the same q/k/v/o projections and rotary embedding as
:class:`flexmask.DynamicMaskAttention` (the DMA layer only adds ``dt_proj`` and ``A``), and the
shared weights start identical across the four models (per-module seeds). All models at one length
see the same training batches and are scored on the same held-out set.

Outputs (``--out DIR``, rewritten after every finished run, so a killed sweep keeps what it did):
``results.json`` (config, environment, one record per run with its learning curve), ``mqar.md``
(accuracy table), ``mqar.png`` (accuracy vs length, one line per attention) and, for the DMA
models at the longest length (``--mask-lengths``), ``masks_<kind>_<N>.png``: what each DMA layer
kept for one held-out input, drawn with :mod:`flexmask.viz` when matplotlib is available. A DMA run's
record also holds the *pair recall* of each layer: the fraction of queries whose pair (the value's
position) the layer's selection kept in at least one head (and per head).

Usage::

    python examples/mqar.py --smoke --out /tmp/mqar_smoke            # CPU, seconds
    python examples/mqar.py --out out/mqar --jobs 16 --total-budget 390  # the GPU sweep

``--jobs J`` trains ``J`` runs at once in worker processes sharing the GPU: these tiny models leave
an H100 mostly idle (their steps are bound by kernel launches), and each run's first step compiles
FlexAttention kernels on the CPU, so running the runs side by side overlaps both. With
``--total-budget`` every run's learning-rate schedule is fitted to the time it has left.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

try:
    import flexmask as fm
except ImportError:  # run from a checkout without `pip install -e .`: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexmask as fm

from flexmask.rotary import apply_rotary  # the rotary embedding DynamicMaskAttention applies: every model shares it

KINDS = ("mha", "swa", "dma-token", "dma-block")
LABELS = {
    "mha": "MHA (causal)",
    "swa": "sliding window",
    "dma-token": "DMA, token selection",
    "dma-block": "DMA, block selection",
}


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    """Everything a sweep depends on (saved into ``results.json``)."""

    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    # data
    num_pairs: int = 16
    num_keys: int = 32
    num_values: int = 32
    num_filler: int = 32
    query_frac: float = 0.75  # queries live in positions [query_frac * N, N)
    # attention
    window: int = 128  # w: keys kept per query (sliding window and DMA keep_window)
    # DMA block selection keeps window // block_size past blocks. 128 = the BlockMask block of
    # fm.attention: topk_blocks with another block size fails to build its BlockMask (flexmask bug).
    block_size: int = 128
    # model
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    mlp_ratio: int = 4
    short_conv: int = 4  # kernel of a depthwise causal convolution on each attention input (0: none)
    rope_theta: float = 10000.0
    # training
    batch_size: int = 16
    steps: int = 3000
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 100
    grad_clip: float = 1.0
    eval_batches: int = 8
    log_every: int = 25
    seed: int = 0
    # limits
    time_budget: float | None = None  # seconds of training per run, after its first (compiling) step
    total_budget: float | None = None  # seconds for the whole sweep; later runs are cut or skipped
    # misc
    device: str = "auto"
    jobs: int = 1
    masks: bool = True
    mask_lengths: list[int] | None = None  # lengths whose DMA masks are drawn (default: the longest)
    smoke: bool = False

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    def query_start(self, length: int) -> int:
        """First position of the query region for sequences of ``length``."""
        return int(length * self.query_frac)

    def validate(self) -> None:
        """Raise ``ValueError`` when the task would be ill-posed (e.g. a window could see a pair)."""
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs ({self.num_pairs}) must be <= num_keys ({self.num_keys}): keys are distinct")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.window < self.block_size:
            raise ValueError(f"window ({self.window}) must be >= block_size ({self.block_size})")
        reach = self.layers * (self.window - 1 + max(0, self.short_conv - 1))
        for n in self.lengths:
            qs = self.query_start(n)
            if qs - 2 * self.num_pairs < reach + 1:
                raise ValueError(
                    f"length {n}: queries start at {qs}, only {qs - 2 * self.num_pairs} positions after the "
                    f"pairs; a stack of {self.layers} windows of {self.window} reaches {reach} back, so a "
                    "window could see the pairs. Use longer sequences, fewer pairs or a smaller window."
                )
            if n - qs < self.num_pairs:
                raise ValueError(f"length {n}: the query region ({n - qs}) is shorter than num_pairs")


def smoke_config() -> Config:
    """A tiny configuration that runs the whole pipeline on CPU in seconds."""
    return Config(
        lengths=[64, 96],
        num_pairs=4,
        num_keys=8,
        num_values=8,
        num_filler=8,
        window=8,
        block_size=4,
        d_model=32,
        heads=2,
        kv_heads=1,
        short_conv=3,
        batch_size=4,
        steps=4,
        warmup=2,
        eval_batches=1,
        log_every=2,
        device="cpu",
        smoke=True,
    )


# ---------------------------------------------------------------------------------------------
# data


def mqar_batch(
    batch: int, length: int, cfg: Config, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of MQAR sequences (on CPU).

    Returns:
        ``inputs`` int64 [B, N]; ``targets`` int64 [B, N] (the paired value at query positions,
        -100 elsewhere); ``query_pos`` int64 [B, P]: the position where pair ``t`` (key at ``2t``,
        value at ``2t + 1``) is queried.
    """
    p, nk, nv = cfg.num_pairs, cfg.num_keys, cfg.num_values
    qs = cfg.query_start(length)
    keys = torch.rand(batch, nk, generator=generator).argsort(-1)[:, :p]  # distinct keys
    values = nk + torch.randint(nv, (batch, p), generator=generator)
    inputs = nk + nv + torch.randint(cfg.num_filler, (batch, length), generator=generator)
    inputs[:, 0 : 2 * p : 2] = keys
    inputs[:, 1 : 2 * p : 2] = values
    query_pos = qs + torch.rand(batch, length - qs, generator=generator).argsort(-1)[:, :p]
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full_like(inputs, -100)
    targets.scatter_(1, query_pos, values)
    return inputs, targets, query_pos


def mqar_targets(inputs: torch.Tensor, num_pairs: int, query_start: int, num_keys: int) -> torch.Tensor:
    """The MQAR targets of ``inputs`` [B, N], straight from the definition (slow; for checks).

    Position ``i >= query_start`` holding a key of the sequence's pairs gets that key's value;
    every other position gets -100.
    """
    out = torch.full_like(inputs, -100)
    for b, row in enumerate(inputs.tolist()):
        table = {row[2 * t]: row[2 * t + 1] for t in range(num_pairs)}
        for i in range(query_start, len(row)):
            if row[i] < num_keys and row[i] in table:
                out[b, i] = table[row[i]]
    return out


# ---------------------------------------------------------------------------------------------
# models


class MaskedAttention(nn.Module):
    """Self-attention with a fixed flexmask mask, laid out like :class:`flexmask.DynamicMaskAttention`.

    Same q/k/v/o projections (no biases), GQA heads and rotary embedding; only the mask differs
    (no ``dt_proj``, no ``A``).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, mask: fm.Mask, rope_theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.mask, self.rope_theta = mask, rope_theta
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, hidden] → [B, N, hidden]."""
        b, n, _ = x.shape
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        pos = torch.arange(n, device=x.device).expand(b, n)
        q, k = apply_rotary(q, pos, self.rope_theta), apply_rotary(k, pos, self.rope_theta)
        out = fm.attention(q, k, v, mask=self.mask)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


def make_attention(kind: str, cfg: Config) -> nn.Module:
    """The attention layer of one model kind."""
    d, h, kv = cfg.d_model, cfg.heads, cfg.kv_heads
    if kind == "mha":
        return MaskedAttention(d, h, kv, fm.causal(), cfg.rope_theta)
    if kind == "swa":
        return MaskedAttention(d, h, kv, fm.causal() & fm.sliding_window(cfg.window), cfg.rope_theta)
    if kind in ("dma-token", "dma-block"):
        return fm.DynamicMaskAttention(
            d,
            num_heads=h,
            num_kv_heads=kv,
            keep_window=cfg.window,
            selection="token" if kind == "dma-token" else "block",
            block_size=cfg.block_size,
            rope_theta=cfg.rope_theta,
        )
    raise ValueError(f"unknown attention kind {kind!r}")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, kind: str, cfg: Config, seed: int):
        super().__init__()
        torch.manual_seed(seed)  # q/k/v/o are created first in both attention classes: same init
        self.attn = make_attention(kind, cfg)
        torch.manual_seed(seed + 1)
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.conv = None
        if cfg.short_conv > 1:
            k = cfg.short_conv
            self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, k, groups=cfg.d_model, padding=k - 1)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, d_model] → [B, N, d_model]."""
        h = self.norm1(x)
        if self.conv is not None:  # causal: drop the outputs that looked ahead
            h = h + self.conv(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        x = x + self.attn(h)
        return x + self.mlp(self.norm2(x))


class RecallModel(nn.Module):
    """A tiny decoder: embedding, ``layers`` blocks, RMSNorm, linear head over the vocabulary."""

    def __init__(self, kind: str, cfg: Config):
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(kind, cfg, cfg.seed + 100 * (i + 1)) for i in range(cfg.layers))
        torch.manual_seed(cfg.seed + 1)
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, N] → logits [B, N, vocab]."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# what DMA kept


def kept_by_topk(scores: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Whether ``fm.topk(scores, k)`` keeps key ``key_pos`` for query ``query_pos``.

    ``scores`` [B, H, N]; ``query_pos``, ``key_pos`` [B, P]. Query ``i`` keeps key ``j <= i`` iff
    fewer than ``k`` keys ``j' <= i`` rank above it (higher score, ties to the later key).
    Returns bool [B, H, P].
    """
    n = scores.shape[-1]
    pos = torch.arange(n, device=scores.device)
    s_j = scores.gather(-1, key_pos[:, None, :].expand(-1, scores.shape[1], -1))[..., None]  # [B, H, P, 1]
    j = key_pos[:, None, :, None]
    i = query_pos[:, None, :, None]
    s = scores[:, :, None, :]
    above = ((s > s_j) | ((s == s_j) & (pos > j))) & (pos <= i)
    return (above.sum(-1) < k) & (j[..., 0] <= i[..., 0])


def kept_by_topk_blocks(
    scores: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, k: int, block_size: int
) -> torch.Tensor:
    """Whether ``fm.topk_blocks(scores, k, block_size=block_size)`` keeps key ``key_pos`` for ``query_pos``.

    A block's score is its best key's; query block ``t`` keeps its own block (causally) and the
    ``k`` best blocks ``u < t`` (ties to the later block). Returns bool [B, H, P].
    """
    b, h, n = scores.shape
    nb = -(-n // block_size)
    blocks = F.pad(scores, (0, nb * block_size - n), value=float("-inf")).view(b, h, nb, block_size).amax(-1)
    tq = (query_pos // block_size)[:, None, :]
    uk = (key_pos // block_size)[:, None, :]
    same = (tq == uk) & (key_pos <= query_pos)[:, None, :]
    s_u = blocks.gather(-1, uk.expand(-1, h, -1))[..., None]
    u = torch.arange(nb, device=scores.device)
    bl = blocks[:, :, None, :]
    above = ((bl > s_u) | ((bl == s_u) & (u > uk[..., None]))) & (u < tq[..., None])
    return same | ((uk < tq) & (above.sum(-1) < k))


def pair_recall(
    model: RecallModel, cfg: Config, inputs: torch.Tensor, query_pos: torch.Tensor
) -> tuple[list[float], list[list[float]]]:
    """How often each DMA layer's selection kept the pair a query needs (its value's position).

    Returns, per DMA layer, the fraction of queries whose pair at least one head kept, and the
    fraction per head (one per score head, i.e. per KV head). Recomputes each layer's per-key
    scores with :func:`flexmask.dynamic_bias` from the layer's input (captured by a forward
    pre-hook), exactly as the layer does, then applies the selection rule. The forward runs with
    autograd enabled, like :func:`evaluate`, so no kernel is compiled again.
    """
    layers = [blk.attn for blk in model.blocks if isinstance(blk.attn, fm.DynamicMaskAttention)]
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(layers)
    ]
    try:
        with _autocast(inputs.device):
            model(inputs)
        with torch.no_grad(), _autocast(inputs.device):
            value_pos = 2 * torch.arange(cfg.num_pairs, device=inputs.device) + 1
            value_pos = value_pos.expand_as(query_pos)
            any_head, per_head = [], []
            for i, layer in enumerate(layers):
                v = rearrange(layer.v_proj(captured[i]), "b n (h d) -> b h n d", d=layer.head_dim)
                scores = fm.dynamic_bias(v, layer.dt_proj, layer.A, layer.bias_form).float()
                if layer.selection == "token":
                    kept = kept_by_topk(scores, query_pos, value_pos, layer.keep_window)
                else:
                    kb = max(1, layer.keep_window // layer.block_size)
                    kept = kept_by_topk_blocks(scores, query_pos, value_pos, kb, layer.block_size)
                any_head.append(float(kept.any(1).float().mean()))
                per_head.append([float(x) for x in kept.float().mean((0, 2))])
    finally:
        for hook in hooks:
            hook.remove()
    return any_head, per_head


# ---------------------------------------------------------------------------------------------
# training


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _lr_factor(step: int, progress: float, cfg: Config) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10% as ``progress`` goes 0 → 1.

    ``progress`` is the larger of the step fraction and the fraction of the run's time limit used,
    so a run cut short by its time budget still finishes its schedule.
    """
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def _optimizer(model: nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=fused)


def _loss_and_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over query positions, number of correct argmaxes, number of queries."""
    flat, tgt = logits.float().flatten(0, 1), targets.flatten()
    loss = F.cross_entropy(flat, tgt, ignore_index=-100)
    sel = tgt != -100
    hits = (flat[sel].argmax(-1) == tgt[sel]).sum()
    return loss, hits, sel.sum()


def evaluate(model: RecallModel, cfg: Config, length: int, device: torch.device) -> tuple[float, tuple]:
    """Accuracy on the fixed held-out set for ``length`` (same for every kind); also returns its first batch.

    Runs with autograd *enabled* (no backward): the compiled FlexAttention graphs were traced in
    grad mode, and a no-grad forward would compile them a second time.
    """
    gen = torch.Generator().manual_seed(10_000_019 + cfg.seed * 7919 + length)
    hits = total = 0
    first = None
    for _ in range(cfg.eval_batches):
        inputs, targets, query_pos = mqar_batch(cfg.batch_size, length, cfg, gen)
        if first is None:
            first = (inputs, targets, query_pos)
        inputs, targets = inputs.to(device), targets.to(device)
        with _autocast(device):
            logits = model(inputs)
        _, h, t = _loss_and_hits(logits.detach(), targets)
        hits, total = hits + int(h), total + int(t)
    return hits / max(1, total), first


def save_mask_plot(model: RecallModel, kind: str, length: int, inputs: torch.Tensor, path: Path) -> str | None:
    """Draw what every DMA layer kept for one input (``flexmask.viz``); ``None`` and a message when unavailable.

    Runs a float32 CPU copy of the model (the exact reference backend: no compilation).
    """
    try:
        from flexmask.viz import plot_layers, record_masks
    except (ImportError, AttributeError) as exc:
        print(f"[masks] flexmask.viz.record_masks/plot_layers unavailable ({exc}); skipping the mask plot")
        return None
    try:
        cpu = copy.deepcopy(model).float().cpu()
        with torch.no_grad(), record_masks() as rec:
            cpu(inputs[:1].cpu())
        fig = plot_layers(rec, title=f"{LABELS[kind]}, N={length}: kept keys")
        fig.savefig(path, dpi=110)
        return path.name
    except (ImportError, AttributeError) as exc:
        print(f"[masks] flexmask.viz is missing something ({exc}); skipping the mask plot")
    except Exception as exc:  # a drawing problem must not lose the run's results
        print(f"[masks] drawing the masks of {kind} N={length} failed: {type(exc).__name__}: {exc}")
    return None


def train_one(kind: str, length: int, cfg: Config, deadline: float | None, out_dir: str | None) -> dict:
    """Train and evaluate one (attention kind, length) run; returns its record."""
    device = _device(cfg)
    record = {
        "kind": kind,
        "length": length,
        "accuracy": None,
        "steps_planned": cfg.steps,
        "steps_done": 0,
        "stopped_early": None,
        "first_step_s": None,
        "train_s": None,
        "step_ms": None,
        "final_train_loss": None,
        "final_train_acc": None,
        "pair_recall": None,
        "pair_recall_per_head": None,
        "masks_png": None,
        "params": None,
        "curve": [],
        "error": None,
        "device": _device_name(device),
    }
    if deadline is not None and time.time() > deadline - 20:
        record["stopped_early"] = "skipped: total budget exhausted before the run started"
        return record
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    model = RecallModel(kind, cfg).to(device)
    record["params"] = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, cfg, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1_000_003 + cfg.seed * 7919 + length)  # same batches for every kind

    loss_sum = torch.zeros((), device=device)
    hit_sum = torch.zeros((), device=device, dtype=torch.long)
    cnt_sum = torch.zeros((), device=device, dtype=torch.long)
    since = 0

    def log_point(steps_done: int) -> dict:
        """Append the mean train loss and query accuracy since the last point to the curve."""
        nonlocal since
        point = {"step": steps_done, "loss": float(loss_sum) / since, "acc": int(hit_sum) / max(1, int(cnt_sum))}
        record["curve"].append(point)
        loss_sum.zero_(), hit_sum.zero_(), cnt_sum.zero_()
        since = 0
        return point

    t0 = time.perf_counter()
    t_train = None
    bar = tqdm(
        total=cfg.steps,
        desc=f"{kind:>9} N={length:<5}",
        mininterval=30 if cfg.jobs > 1 else 10,
        leave=False,
        disable=cfg.smoke,
        dynamic_ncols=True,
    )
    try:
        limit, limited_by = None, None  # seconds of training allowed after the first step, and by what
        for step in range(cfg.steps):
            p_steps = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            p_time = 0.0
            if limit is not None:
                p_time = (time.perf_counter() - t_train) / max(limit, 1e-9)
                if p_time >= 1:
                    record["stopped_early"] = f"{limited_by} after {step} steps"
                    break
            inputs, targets, _ = mqar_batch(cfg.batch_size, length, cfg, gen)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, max(p_steps, p_time), cfg)
            with _autocast(device):
                logits = model(inputs)
            loss, hits, count = _loss_and_hits(logits, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach()
            hit_sum += hits
            cnt_sum += count
            since += 1
            record["steps_done"] = step + 1
            bar.update(1)
            if step == 0:  # the first step compiles; the time limits count from its end
                _sync(device)
                t_train = time.perf_counter()
                record["first_step_s"] = round(t_train - t0, 2)
                if cfg.time_budget is not None:
                    limit, limited_by = cfg.time_budget, f"time budget ({cfg.time_budget:g} s)"
                if deadline is not None and (limit is None or deadline - 15 - time.time() < limit):
                    limit, limited_by = deadline - 15 - time.time(), "total budget"
            if (step + 1) % cfg.log_every == 0:
                point = log_point(step + 1)
                bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['acc']:.3f}", refresh=False)
                if not math.isfinite(point["loss"]):  # diverged: say so instead of training on NaNs
                    record["stopped_early"] = f"diverged: non-finite training loss by step {step + 1}"
                    break
        if since:
            log_point(record["steps_done"])
        _sync(device)
        done = record["steps_done"]
        if t_train is not None and done > 1:
            record["train_s"] = round(time.perf_counter() - t_train, 2)
            record["step_ms"] = round(1000 * record["train_s"] / (done - 1), 2)
        if record["curve"]:
            record["final_train_loss"] = record["curve"][-1]["loss"]
            record["final_train_acc"] = record["curve"][-1]["acc"]
        bar.close()

        acc, (inputs, _, query_pos) = evaluate(model, cfg, length, device)
        record["accuracy"] = acc
        if kind.startswith("dma"):
            recall = pair_recall(model, cfg, inputs.to(device), query_pos.to(device))
            record["pair_recall"], record["pair_recall_per_head"] = recall
            mask_lengths = cfg.mask_lengths if cfg.mask_lengths is not None else [max(cfg.lengths)]
            if cfg.masks and out_dir is not None and length in mask_lengths:
                png = Path(out_dir) / f"masks_{kind}_{length}.png"
                record["masks_png"] = save_mask_plot(model, kind, length, inputs, png)
    finally:
        bar.close()
    return record


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _worker(kind: str, length: int, cfg_dict: dict, deadline: float | None, out_dir: str | None) -> dict:
    """Entry point of one run in a worker process (catches everything into the record)."""
    cfg = Config(**cfg_dict)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, cfg.jobs)))
        return train_one(kind, length, cfg, deadline, out_dir)
    except Exception as exc:
        traceback.print_exc()
        return {"kind": kind, "length": length, "accuracy": None, "error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------
# outputs


def _fmt_acc(rec: dict | None) -> str:
    if rec is None:
        return "—"
    if rec.get("error"):
        return "error"
    if rec.get("accuracy") is None:
        return "skipped"
    mark = "*" if rec.get("stopped_early") else ""
    return f"{100 * rec['accuracy']:.1f}{mark}"


def markdown_table(results: dict) -> str:
    """The accuracy table (kinds × lengths) and a per-run detail table, as markdown."""
    cfg = results["config"]
    runs = {(r["kind"], r["length"]): r for r in results["runs"]}
    lengths = cfg["lengths"]
    lines = [
        f"MQAR accuracy (%) on {cfg['eval_batches'] * cfg['batch_size']} held-out sequences × "
        f"{cfg['num_pairs']} queries; window / keep_window w = {cfg['window']}, DMA block size "
        f"{cfg['block_size']} ({_blocks_kept(cfg)} kept, plus the query's own); chance = "
        f"{100 / cfg['num_values']:.1f}%.",
        "",
        "| attention | " + " | ".join(f"N = {n}" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for kind in cfg["kinds"]:
        lines.append(f"| {LABELS[kind]} | " + " | ".join(_fmt_acc(runs.get((kind, n))) for n in lengths) + " |")
    lines += [
        "",
        "`*`: training stopped early (time or total budget); see the steps column below.",
        "",
        "| attention | N | steps | first step (s, compile) | ms / step | final train loss "
        "| pair recall per layer (any head) | note |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for kind in cfg["kinds"]:
        for n in lengths:
            r = runs.get((kind, n))
            if r is None:
                continue
            recall = "" if not r.get("pair_recall") else ", ".join(f"{100 * x:.0f}%" for x in r["pair_recall"])
            loss = r.get("final_train_loss")
            note = r.get("error") or r.get("stopped_early") or ""
            lines.append(
                f"| {LABELS[kind]} | {n} | {r.get('steps_done', 0)}/{r.get('steps_planned', cfg['steps'])} | "
                f"{_num(r.get('first_step_s'))} | {_num(r.get('step_ms'))} | "
                f"{'' if loss is None else f'{loss:.3f}'} | {recall} | {note} |"
            )
    env = results["environment"]
    lines += [
        "",
        f"Device: {env['device']}; torch {env['torch']}; {env['date']}; seed {cfg['seed']}.",
        f"Command: `{env['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _blocks_kept(cfg: dict) -> str:
    nb = max(1, cfg["window"] // cfg["block_size"])
    return f"{nb} past block" + ("s" if nb != 1 else "")


def _num(x) -> str:
    return "" if x is None else f"{x:g}"


def plot_results(results: dict, path: Path) -> None:
    """Accuracy vs sequence length, one line per attention kind (matplotlib, Agg)."""
    from matplotlib.figure import Figure

    cfg = results["config"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    styles = {"mha": ("C0", "o"), "swa": ("C3", "s"), "dma-token": ("C2", "^"), "dma-block": ("C1", "v")}
    for kind in cfg["kinds"]:
        pts = sorted(
            (r["length"], r["accuracy"]) for r in results["runs"] if r["kind"] == kind and r.get("accuracy") is not None
        )
        if pts:
            color, marker = styles[kind]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, color=color, label=LABELS[kind])
    ax.axhline(100 / cfg["num_values"], color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg["lengths"], [str(n) for n in cfg["lengths"]])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"MQAR, {cfg['num_pairs']} pairs, w = {cfg['window']}, {cfg['layers']} layers, d = {cfg['d_model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(results: dict, out: Path) -> None:
    """``results.json``, ``mqar.md`` and ``mqar.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "mqar.md").write_text(markdown_table(results))
    try:
        plot_results(results, out / "mqar.png")
    except Exception as exc:  # a plotting problem must not lose the numbers
        print(f"[plot] accuracy plot failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# the sweep


def sweep(cfg: Config, out: Path, command: str) -> dict:
    """Run every (kind, length), sequentially or in ``cfg.jobs`` worker processes; write outputs as runs finish."""
    cfg.validate()
    start = time.time()
    deadline = None if cfg.total_budget is None else start + cfg.total_budget
    device = _device(cfg)
    results = {
        "config": dataclasses.asdict(cfg),
        "environment": {
            "device": _device_name(device) if cfg.jobs <= 1 or device.type != "cuda" else "cuda",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
        },
        "runs": [],
        "wall_s": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    # One length at a time (its kinds train side by side, under the same conditions), the longest
    # first: a sweep cut short by --total-budget loses the cheapest runs.
    jobs = [(kind, n) for n in sorted(cfg.lengths, reverse=True) for kind in cfg.kinds]

    def finished(rec: dict) -> None:
        if rec.get("device"):  # the workers name the GPU (the parent never initialises CUDA)
            results["environment"]["device"] = rec["device"]
        results["runs"].append(rec)
        results["runs"].sort(key=lambda r: (cfg.lengths.index(r["length"]), cfg.kinds.index(r["kind"])))
        results["wall_s"] = round(time.time() - start, 1)
        write_outputs(results, out)
        acc = "—" if rec.get("accuracy") is None else f"{100 * rec['accuracy']:.1f}%"
        extra = ""
        if rec.get("pair_recall"):
            extra = " pair recall " + "/".join(f"{100 * x:.0f}%" for x in rec["pair_recall"])
        why = rec.get("error") or rec.get("stopped_early") or ""
        tqdm.write(
            f"[mqar] {rec['kind']:>9} N={rec['length']:<5} acc {acc:>6}  steps {rec.get('steps_done', 0)}"
            f"  first step {rec.get('first_step_s')} s  {rec.get('step_ms')} ms/step{extra}"
            f"  {why}  (t={time.time() - start:.0f}s)"
        )
        sys.stdout.flush()

    overall = tqdm(total=len(jobs), desc="mqar sweep", disable=cfg.smoke, mininterval=1)
    if cfg.jobs <= 1:
        for kind, n in jobs:
            try:
                rec = train_one(kind, n, cfg, deadline, str(out))
            except Exception as exc:
                if cfg.smoke:
                    raise
                traceback.print_exc()
                rec = {"kind": kind, "length": n, "accuracy": None, "error": f"{type(exc).__name__}: {exc}"}
            finished(rec)
            overall.update(1)
    else:
        threads = max(1, (os.cpu_count() or 2) // cfg.jobs)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
        ctx = multiprocessing.get_context("spawn")
        cfg_dict = dataclasses.asdict(cfg)
        pool = cf.ProcessPoolExecutor(max_workers=min(cfg.jobs, len(jobs)), mp_context=ctx)
        futures = {pool.submit(_worker, kind, n, cfg_dict, deadline, str(out)): (kind, n) for kind, n in jobs}
        # A run that hangs must not hold the sweep past its budget: stop waiting a little after it.
        timeout = None if deadline is None else max(0.0, deadline + 45 - time.time())
        try:
            for fut in cf.as_completed(futures, timeout=timeout):
                kind, n = futures[fut]
                try:
                    rec = fut.result()
                except Exception as exc:  # a crashed worker process
                    rec = {"kind": kind, "length": n, "accuracy": None, "error": f"{type(exc).__name__}: {exc}"}
                finished(rec)
                overall.update(1)
            pool.shutdown(wait=True)
        except cf.TimeoutError:
            for fut, (kind, n) in futures.items():
                if not fut.done():
                    finished(
                        {
                            "kind": kind,
                            "length": n,
                            "accuracy": None,
                            "error": "no result 45 s after the total budget: worker stopped",
                        }
                    )
            for proc in list(getattr(pool, "_processes", {}).values()):  # the workers this sweep started
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
    overall.close()
    results["wall_s"] = round(time.time() - start, 1)
    write_outputs(results, out)
    print(markdown_table(results))
    print(f"[mqar] wrote {out / 'results.json'}, {out / 'mqar.md'}, {out / 'mqar.png'} in {results['wall_s']} s")
    return results


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path]:
    """Command-line options → (config, output folder)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--lengths", type=int, nargs="+", default=None, help=f"sequence lengths (default {d.lengths})")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None, help="attention kinds (default all)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--window", type=int, default=None, help=f"w: window and DMA keep_window (default {d.window})")
    p.add_argument("--block-size", type=int, default=None, help=f"DMA block selection block (default {d.block_size})")
    p.add_argument(
        "--short-conv",
        type=int,
        default=None,
        help=f"kernel of the causal depthwise conv on attention inputs, 0 = none (default {d.short_conv})",
    )
    p.add_argument("--num-pairs", type=int, default=None, help=f"key-value pairs per sequence (default {d.num_pairs})")
    p.add_argument("--eval-batches", type=int, default=None, help=f"held-out batches (default {d.eval_batches})")
    p.add_argument("--seed", type=int, default=None, help=f"seed (default {d.seed})")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training per run after its first (compiling) step; the run stops early "
        "and says so when it is exceeded",
    )
    p.add_argument(
        "--total-budget",
        type=float,
        default=None,
        help="seconds for the whole sweep: runs still training near the end stop early, runs not "
        "started by then are skipped (both reported)",
    )
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once in worker processes (default 1)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    p.add_argument("--no-masks", action="store_true", help="skip the learned-mask plots of the DMA models")
    p.add_argument(
        "--mask-lengths",
        type=int,
        nargs="+",
        default=None,
        help="lengths whose learned DMA masks are drawn (default: the longest)",
    )
    p.add_argument("--out", type=Path, default=Path("mqar_out"), help="output folder")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline (seconds)")
    a = p.parse_args(argv)
    cfg = smoke_config() if a.smoke else Config()
    overrides = {
        "lengths": a.lengths,
        "kinds": a.kinds,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "window": a.window,
        "block_size": a.block_size,
        "short_conv": a.short_conv,
        "num_pairs": a.num_pairs,
        "eval_batches": a.eval_batches,
        "seed": a.seed,
        "time_budget": a.time_budget,
        "total_budget": a.total_budget,
        "jobs": a.jobs,
        "device": a.device,
        "mask_lengths": a.mask_lengths,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    if a.no_masks:
        cfg.masks = False
    cfg.warmup = min(cfg.warmup, max(1, cfg.steps // 10))
    return cfg, a.out


def main(argv: list[str] | None = None) -> dict:
    """``python examples/mqar.py [options]``."""
    cfg, out = parse_args(argv)
    command = "python examples/mqar.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return sweep(cfg, out, command)


if __name__ == "__main__":
    main()
