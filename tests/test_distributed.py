"""flexmask.distributed on CPU: context parallelism and FSDP2 over 2 and 4 processes (gloo) against
one device.

Each group of processes is started once per module (``spawn``, a file store under ``tmp_path``, a
timeout on every collective and on the whole group, so a hang fails instead of blocking): the
workers run every case and write what they measured; the tests below read it. The truth is
single-device ``fm.attention`` (itself checked against ``tests/_reference.py``) in float64, on the
whole sequence; each rank compares its shard of the output and of every gradient, ≤ 1e-10 relative.
Learnable tables are replicated: the sum of the ranks' gradients is compared.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import math
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexmask as fm
import flexmask.distributed as fmd
from flexmask.distributed.layouts import chunk_owners, pieces
from flexmask.rotary import apply_rotary

from ._reference import rel_err

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_fsdp.py"
TOL = 1e-10
GROUP_TIMEOUT_S = 240  # a whole group of workers; each collective times out after 60 s
B, HQ, HKV, D = 2, 4, 2, 8


# ---------------------------------------------------------------------------------------------
# running a group of workers


def _entry(worker, rank: int, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    nccl = "cuda" in args  # the GPU test: NCCL, one GPU per rank
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = worker(rank, world, *args)
    except BaseException:
        results = {"__error__": traceback.format_exc()}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(results))
    gc.collect()  # free what holds the group (FSDP modules), so gloo's threads end before Python does
    dist.destroy_process_group()


def run_group(worker, world: int, tmp: Path, *args) -> list[dict]:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes; their results, by rank."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(worker, r, world, str(tmp), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail(f"{worker.__name__} on {world} processes did not finish within {GROUP_TIMEOUT_S} s")
    results = []
    for r, p in enumerate(procs):
        out = tmp / f"rank{r}.json"
        assert out.exists(), f"rank {r} of {worker.__name__} wrote no result (exit code {p.exitcode})"
        results.append(json.loads(out.read_text()))
        assert "__error__" not in results[-1], results[-1]["__error__"]
        assert p.exitcode == 0, f"rank {r} of {worker.__name__} exited with {p.exitcode}"
    return results


def _shard(t: torch.Tensor, dim: int, layout: str) -> torch.Tensor:
    return fmd.shard(t.detach(), dim, layout=layout).requires_grad_(t.requires_grad)


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------
# context-parallel cases: whole tensors, and the mask and bias built from whole or sharded ones


CASES = {
    # name: (position-indexed tensors {name: kind}, tables {name: shape}, build(seq, tables, N) -> (mask, bias, kwargs))
    "full": ({}, {}, lambda s, t, n: (None, None, {})),
    "causal": ({}, {}, lambda s, t, n: (fm.causal(), None, {})),
    "sliding_window": ({}, {}, lambda s, t, n: (fm.sliding_window(23), None, {})),
    "chunked": ({}, {}, lambda s, t, n: (fm.causal() & fm.chunked(16), None, {})),
    "documents": ({"ids": "ids"}, {}, lambda s, t, n: (fm.causal() & fm.document(s["ids"]), None, {})),
    "padding": ({}, {}, lambda s, t, n: (fm.causal() & fm.padding(torch.tensor([n - 5, n // 3])), None, {})),
    "prefix": ({}, {}, lambda s, t, n: (fm.prefix_lm(torch.tensor([20, n - 9])), None, {})),
    "bias_tables": (
        {},
        {"table": (HQ, 8)},  # (a head_bias alone has a zero gradient: it cancels in the softmax)
        lambda s, t, n: (
            fm.causal() | fm.prefix_lm(5),
            fm.alibi(HQ) + fm.relative_bias(t["table"], max_distance=32),
            {"scale": 0.3, "softcap": 5.0},
        ),
    ),
    "tensor_bias_keys": (
        {"t": "keys"},
        {},
        lambda s, t, n: (fm.causal(), fm.tensor_bias(s["t"]) + fm.alibi(HQ), {}),
    ),
    "dma_topk": (
        {"s": "kv_scores", "ids": "ids"},
        {},
        lambda s, t, n: (
            fm.topk(s["s"].detach(), 12, among=fm.padding(torch.tensor([n, n - 7])) & fm.document(s["ids"])),
            fm.key_bias(s["s"]),
            {},
        ),
    ),
    # one tensor in the mask and the bias (gathered once), one score per query head
    "dma_topk_query_heads": ({"s": "q_scores"}, {}, lambda s, t, n: (fm.topk(s["s"], 9), fm.key_bias(s["s"]), {})),
    "dma_topk_blocks": (
        {"s": "kv_scores"},
        {},
        lambda s, t, n: (fm.topk_blocks(s["s"].detach(), 2, block_size=8), fm.key_bias(s["s"]), {}),
    ),
    "mqa_custom_mask": (
        {},
        {},
        lambda s, t, n: (fm.causal() & fm.mask(lambda b, h, q, kv: (kv % 3 != 1) | (kv == q), name="skip"), None, {}),
    ),
}
MQA = {"mqa_custom_mask"}


def _sequence_tensor(kind: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, bool]:
    """A whole sequence-indexed tensor (last dim = position) and whether it requires grad."""
    if kind == "ids":  # packed documents, boundaries anywhere (also inside a shard)
        return torch.randint(0, 5, (B, n), generator=g).sort(-1).values, False
    if kind == "keys":
        return torch.randn(B, 1, 1, n, generator=g, dtype=torch.float64), True
    heads = HKV if kind == "kv_scores" else HQ
    return torch.randn(B, heads, n, generator=g, dtype=torch.float64), True


def _compare(errs: dict, name: str, dist_t: torch.Tensor | None, whole: torch.Tensor | None, dim: int, layout: str):
    if whole is None and dist_t is None:
        return
    errs[name] = rel_err(dist_t, fmd.shard(whole, dim, layout=layout))


def _run_case(name: str, world: int, layout: str, device: str = "cpu", dtype=torch.float64) -> dict[str, float]:
    seq_kinds, table_shapes, build = CASES[name]
    n = world * 37 * (2 if layout == "balanced" else 1)  # odd shard lengths (contiguous), odd chunks (balanced)
    g = torch.Generator().manual_seed(len(name) * 1000 + n)  # the same draws on every rank

    def leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
        t = t.to(device, dtype if t.is_floating_point() else t.dtype)
        return t.requires_grad_(grad)

    hkv = 1 if name in MQA else HKV
    q, k, v = (leaf(torch.randn(B, h, n, d, generator=g)) for h, d in ((HQ, D), (hkv, D), (hkv, D + 2)))
    seq = {key: _sequence_tensor(kind, n, g) for key, kind in seq_kinds.items()}
    seq = {key: leaf(t, grad) for key, (t, grad) in seq.items()}
    tables = {key: leaf(torch.randn(shape, generator=g)) for key, shape in table_shapes.items()}
    kwargs_all = {"options": {"backend": "reference"}} if dtype == torch.float64 else {}  # (flex: no fp64)
    mask, bias, kwargs = build(seq, tables, n)
    ref = fm.attention(q, k, v, mask=mask, bias=bias, **kwargs, **kwargs_all)
    go = leaf(torch.randn(ref.shape, generator=g), False)
    ref.backward(go)

    shards = {key: _shard(t, -1, layout) for key, t in seq.items()}
    qs, ks, vs = (_shard(t, 2, layout) for t in (q, k, v))
    ref_tables = {key: t.grad for key, t in tables.items()}
    for t in tables.values():
        t.grad = None
    mask, bias, kwargs = build(shards, tables, n)
    out = fmd.attention(qs, ks, vs, mask=mask, bias=bias, layout=layout, **kwargs, **kwargs_all)
    out.backward(fmd.shard(go, 2, layout=layout))
    errs: dict[str, float] = {}
    _compare(errs, "out", out, ref, 2, layout)
    for key, s, w in (("dq", qs, q), ("dk", ks, k), ("dv", vs, v)):
        _compare(errs, key, s.grad, w.grad, 2, layout)
    for key, t in seq.items():
        if t.requires_grad:
            _compare(errs, f"d{key}", shards[key].grad, t.grad, -1, layout)
    for key, t in tables.items():
        errs[f"d{key} (summed over ranks)"] = rel_err(_summed(t.grad), ref_tables[key])
    return errs


def _run_per_block_case(world: int, layout: str) -> dict[str, float]:
    """``fm.topk_blocks`` with one score per block: each run of positions a rank holds is 4 blocks of 8."""
    n = world * 32 * (2 if layout == "balanced" else 1)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (HQ, HKV, HKV))
    blocks = torch.randn(B, HKV, n // 8, generator=g, dtype=torch.float64)
    s = torch.randn(B, HKV, n, generator=g, dtype=torch.float64, requires_grad=True)
    ref = fm.attention(q, k, v, mask=fm.topk_blocks(blocks, 1, block_size=8), bias=fm.key_bias(s))
    ref.sum().backward()
    qs, ks, vs, ss = (_shard(t, 2 if t.dim() == 4 else -1, layout) for t in (q, k, v, s))
    mask = fm.topk_blocks(fmd.shard(blocks, -1, layout=layout), 1, block_size=8)
    out = fmd.attention(qs, ks, vs, mask=mask, bias=fm.key_bias(ss), layout=layout)
    out.sum().backward()
    errs: dict[str, float] = {}
    _compare(errs, "out", out, ref, 2, layout)
    for key, sh, w, dim in (("dq", qs, q, 2), ("dk", ks, k, 2), ("dv", vs, v, 2), ("ds", ss, s, -1)):
        _compare(errs, key, sh.grad, w.grad, dim, layout)
    return errs


def dma_forward_cp(layer: fm.DynamicMaskAttention, x: torch.Tensor, *, layout: str = "balanced", group=None):
    """The recipe of docs/scaling.md: a ``fm.DynamicMaskAttention`` layer on this rank's shard ``x``
    ``[B, N / world, hidden]`` of the sequence."""
    bsz, n, _ = x.shape
    world = dist.get_world_size(group)
    positions = fmd.shard(torch.arange(n * world, device=x.device), 0, layout=layout, group=group)
    q = layer.q_proj(x).unflatten(-1, (layer.num_heads, layer.head_dim)).transpose(1, 2)
    k = layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, layer.head_dim)).transpose(1, 2)
    v = layer.v_proj(x).unflatten(-1, (layer.num_kv_heads, layer.head_dim)).transpose(1, 2)
    q = apply_rotary(q, positions.expand(bsz, n), layer.rope_theta)
    k = apply_rotary(k, positions.expand(bsz, n), layer.rope_theta)
    scores = fm.dynamic_bias(v, layer.dt_proj, layer.A, layer.bias_form)  # this rank's keys' scores
    mask, bias = layer.content_mask(scores), fm.key_bias(scores.to(q.dtype))
    out = fmd.attention(q, k, v, mask=mask, bias=bias, layout=layout, group=group)
    return layer.o_proj(out.transpose(1, 2).flatten(2))


def _run_dma_layer(world: int, layout: str, selection: str) -> dict[str, float]:
    n = world * 20 * (2 if layout == "balanced" else 1)
    torch.manual_seed(3)
    layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=16, selection=selection, block_size=8).double()
    with torch.no_grad():
        layer.A.normal_()
        layer.dt_proj.weight.normal_(0.0, layer.dt_proj.in_features**-0.5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, n, 32, generator=g, dtype=torch.float64, requires_grad=True)
    ref = layer(x)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(go)
    ref_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    xs = _shard(x, 1, layout)
    out = dma_forward_cp(layer, xs, layout=layout)
    out.backward(fmd.shard(go, 1, layout=layout))
    errs: dict[str, float] = {}
    _compare(errs, "out", out, ref, 1, layout)
    _compare(errs, "dx", xs.grad, x.grad, 1, layout)
    for name, p in layer.named_parameters():
        errs[f"d{name} (summed over ranks)"] = rel_err(_summed(p.grad), ref_grads[name])
    return errs


def _run_compiled(world: int, layout: str) -> dict[str, float]:
    """``torch.compile`` (aot_eager on CPU: dynamo and AOTAutograd, as on GPU) traces fmd.attention,
    its gathers and their reduce-scatter backward in one graph (no graph break), with DMA."""
    from torch._dynamo.utils import counters

    n = world * 16 * (2 if layout == "balanced" else 1)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (HQ, HKV, HKV))
    s = torch.randn(B, HKV, n, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 3, (B, n), generator=g).sort(-1).values
    ref = fm.attention(q, k, v, mask=fm.topk(s, 6, among=fm.document(ids)), bias=fm.key_bias(s))
    ref.sum().backward()

    def step(q, k, v, s, ids):
        mask = fm.topk(s, 6, among=fm.document(ids))
        return fmd.attention(q, k, v, mask=mask, bias=fm.key_bias(s), layout=layout)

    qs, ks, vs, ss = (_shard(t, 2 if t.dim() == 4 else -1, layout) for t in (q, k, v, s))
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(step, backend="aot_eager")(qs, ks, vs, ss, fmd.shard(ids, -1, layout=layout))
    out.sum().backward()
    errs = {"graph breaks": float(sum(counters["graph_break"].values()))}
    _compare(errs, "out", out, ref, 2, layout)
    for key, sh, w, dim in (("dq", qs, q, 2), ("dk", ks, k, 2), ("dv", vs, v, 2), ("ds", ss, s, -1)):
        _compare(errs, key, sh.grad, w.grad, dim, layout)
    return errs


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _error_cases(rank: int, world: int) -> dict[str, str]:
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    per_rank = 8 + 2 * rank
    return {
        "different shard lengths": _error(
            lambda: fmd.attention(t(1, 2, per_rank, 4), t(1, 2, per_rank, 4), t(1, 2, per_rank, 4))
        ),
        "odd balanced shard": _error(
            lambda: fmd.attention(t(1, 2, 7, 4), t(1, 2, 7, 4), t(1, 2, 7, 4), layout="balanced")
        ),
        "tensor_bias with queries": _error(
            lambda: fmd.attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), bias=fm.tensor_bias(t(1, 1, 8, 8)))
        ),
        "whole ids": _error(
            lambda: fmd.attention(
                t(1, 2, 8, 4),
                t(1, 2, 8, 4),
                t(1, 2, 8, 4),
                mask=fm.document(torch.zeros(1, 8 * world, dtype=torch.long)),
            )
        ),
        "per-block scores off the blocks": _error(
            lambda: fmd.attention(
                t(1, 2, 12, 4),
                t(1, 2, 12, 4),
                t(1, 2, 12, 4),
                mask=fm.topk_blocks(t(1, 2, 3), 1, block_size=4),
                layout="balanced",
            )
        ),
        "shard of a length that does not split": _error(lambda: fmd.shard(torch.arange(7), 0)),
        "unshard of different shapes": _error(lambda: fmd.unshard(t(3, 2 + rank), 0)),
        "shard and unshard round trip": str(
            fmd.unshard(fmd.shard(torch.arange(24), 0, layout="balanced"), 0, layout="balanced").tolist()
            == list(range(24))
        ),
    }


def _cp_worker(rank: int, world: int, names: list[str], layouts: list[str], extras: bool, device: str = "cpu") -> dict:
    results: dict = {}
    for layout in layouts:
        for name in names:
            results[f"{layout}/{name}"] = _run_case(name, world, layout, device)
        if extras:
            results[f"{layout}/topk_blocks_per_block"] = _run_per_block_case(world, layout)
            for selection in ("token", "block"):
                results[f"{layout}/dma_layer_{selection}"] = _run_dma_layer(world, layout, selection)
            results[f"{layout}/compiled"] = _run_compiled(world, layout)
    if extras:
        results["errors"] = _error_cases(rank, world)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_group(_cp_worker, 2, tmp_path_factory.mktemp("cp2"), list(CASES), ["contiguous", "balanced"], True)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    names = ["causal", "documents", "dma_topk", "dma_topk_blocks"]
    return run_group(_cp_worker, 4, tmp_path_factory.mktemp("cp4"), names, ["contiguous", "balanced"], False)


def _assert_exact(results: list[dict], key: str) -> None:
    for rank, result in enumerate(results):
        errs = result[key]
        assert errs and all(math.isfinite(e) and e <= TOL for e in errs.values()), f"rank {rank}, {key}: {errs}"


EXTRA = ["topk_blocks_per_block", "dma_layer_token", "dma_layer_block", "compiled"]


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
@pytest.mark.parametrize("case", [*CASES, *EXTRA])
def test_context_parallel_on_two_ranks_equals_one_device(two_ranks, case, layout):
    """Output and every gradient, on shards of odd lengths (37 positions per run), GQA (MQA for the
    custom mask), each mask kind and DMA, equal the single-device call."""
    _assert_exact(two_ranks, f"{layout}/{case}")


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
@pytest.mark.parametrize("case", ["causal", "documents", "dma_topk", "dma_topk_blocks"])
def test_context_parallel_on_four_ranks_equals_one_device(four_ranks, case, layout):
    _assert_exact(four_ranks, f"{layout}/{case}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_context_parallel_on_two_gpus_nccl(tmp_path):
    """The same cases over NCCL on 2 GPUs, float64 through the reference backend (≤ 1e-10). (FlexAttention
    over NCCL runs in `bench cp` and `examples/train_fsdp.py`; a float32 flex leg on these 37-row shards
    failed to compile on an H200 with torch 2.11: inductor found no kernel configuration.)"""
    names = ["causal", "sliding_window", "documents", "padding", "dma_topk", "dma_topk_blocks"]
    results = run_group(_cp_worker, 2, tmp_path, names, ["contiguous", "balanced"], False, "cuda")
    for key in results[0]:
        for rank, result in enumerate(results):
            assert all(e <= TOL for e in result[key].values()), f"rank {rank}, {key}: {result[key]}"


ERRORS = {
    "different shard lengths": "ValueError: the ranks of the group disagree on shard length "
    "(rank 0: shard length=8; rank 1: shard length=10)",
    "odd balanced shard": "ValueError: this rank's shard of q, k, v has 7 positions per rank, but a 'balanced' shard",
    "tensor_bias with queries": "ValueError: tensor_bias of shape (1, 1, 8, 8) has a query dimension",
    "whole ids": "ValueError: a sequence-indexed tensor of the mask or bias has shape (1, 16), but this rank's shard",
    "per-block scores off the blocks": "ValueError: topk_blocks scores have shape (1, 2, 3), not one score per key",
    "shard of a length that does not split": "ValueError: x along dim has length 7, which does not split into 2",
    "unshard of different shapes": "ValueError: the ranks of the group disagree on the shape",
    "shard and unshard round trip": "True",
}


@pytest.mark.parametrize("what", list(ERRORS))
def test_errors_name_the_problem_on_every_rank(two_ranks, what):
    """Every rank raises the same clear error (none hangs waiting for the others)."""
    for result in two_ranks:
        got = result["errors"][what]
        assert got.startswith(ERRORS[what]), got


# ---------------------------------------------------------------------------------------------
# FSDP2: the model of the example (fm.hf.to_dma) and one built from fm.DynamicMaskAttention


def _example():
    spec = importlib.util.spec_from_file_location("train_fsdp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DMADecoder(torch.nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(layers))
        self.attn = torch.nn.ModuleList(fm.DynamicMaskAttention(hidden, 4, 2, keep_window=12) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)
        with torch.no_grad():
            for layer in self.attn:
                layer.A.normal_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for norm, attn in zip(self.norms, self.attn, strict=True):
            x = x + attn(norm(x))
        return self.head(x)


def _fsdp_case(world: int, ref_fn, model_fn, loss_fn, batches, shard_fn) -> dict[str, float]:
    """Two SGD steps of a model on the whole batch (one process) and under FSDP2: losses and grads."""
    from torch.distributed.device_mesh import init_device_mesh

    ref, model = ref_fn(), model_fn()
    shard_fn(model, init_device_mesh("cpu", (world,)))
    errs: dict[str, float] = {}
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, model)]
    for step, (whole, mine) in enumerate(batches):
        for m, opt, batch, w in ((ref, opts[0], whole, 1), (model, opts[1], mine, world)):
            opt.zero_grad()
            loss = loss_fn(m, batch, w)
            loss.backward()
            if m is ref:
                ref_loss = loss.detach()
            else:
                errs[f"loss {step}"] = rel_err(_summed(loss.detach()) / world, ref_loss)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            errs[f"d{name} {step}"] = rel_err(p.grad.full_tensor(), q.grad)
        for opt in opts:
            opt.step()
    return errs


def _fsdp_worker(rank: int, world: int) -> dict:
    ex = _example()
    results = {}
    for variant, cp in (
        ("dma-token", "off"),
        ("dma-block", "contiguous"),
        ("dma-token", "balanced"),
        ("flexmask", "balanced"),
    ):
        args = ex.parse_args(
            ["--tiny", "--variant", variant, "--length", "72", "--keep-window", "16", "--block-size", "8"]
        )
        batch = world if cp == "off" else 1
        batches = []
        for step in range(2):
            ids, labels = ex.global_batch(args, step, batch)
            total = int((labels != -100).sum())
            batches.append(((ids, labels, None, total), (*ex.rank_batch(ids, labels, cp, rank, world), total)))

        def reference(args=args):  # the whole batch through fm.hf's own attention
            return ex.build_model(args, torch.device("cpu"), torch.float64)

        def build(cp=cp, args=args):
            model = ex.build_model(args, torch.device("cpu"), torch.float64)
            return ex.enable_context_parallel(model, cp) if cp != "off" else model

        def loss(model, batch, w):
            ids, labels, positions, total = batch
            return ex.rank_loss(model, ids, labels, positions, total, w)

        results[f"hf {variant} cp={cp}"] = _fsdp_case(world, reference, build, loss, batches, ex.shard_model)

    def dma_loss(model, batch, w):
        ids = batch
        logits = model(ids)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return ce * w / (2 * world * (ids.shape[1] - 1))

    def dma_shard(model, mesh):
        from torch.distributed.fsdp import fully_shard

        for layer in model.attn:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    g = torch.Generator().manual_seed(5)
    whole = [torch.randint(0, 64, (2 * world, 40), generator=g) for _ in range(2)]
    batches = [(w, w[2 * rank : 2 * rank + 2]) for w in whole]
    decoder = lambda: _seeded(lambda: _DMADecoder().double())  # noqa: E731
    results["DynamicMaskAttention data parallel"] = _fsdp_case(world, decoder, decoder, dma_loss, batches, dma_shard)
    return results


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return build()


@pytest.fixture(scope="module")
def fsdp_two_ranks(tmp_path_factory) -> list[dict]:
    pytest.importorskip("transformers")
    return run_group(_fsdp_worker, 2, tmp_path_factory.mktemp("fsdp2"))


@pytest.mark.parametrize(
    "case",
    [
        "hf dma-token cp=off",
        "hf dma-block cp=contiguous",
        "hf dma-token cp=balanced",
        "hf flexmask cp=balanced",
        "DynamicMaskAttention data parallel",
    ],
)
def test_fsdp2_training_equals_one_process(fsdp_two_ranks, case):
    """Two SGD steps under ``fully_shard`` on 2 ranks (data parallel: half the batch each; context
    parallel: a shard of every sequence each, attention through fmd.attention) give the losses and
    gradients of one process on the whole batch."""
    _assert_exact(fsdp_two_ranks, case)


# ---------------------------------------------------------------------------------------------
# without a group


def test_layouts_cover_the_sequence_once():
    for world in (1, 2, 3, 4):
        for layout in ("contiguous", "balanced"):
            n = 6
            covered = sorted(
                pos
                for r in range(world)
                for p in pieces(n, world, r, layout)
                for pos in range(p.start, p.start + p.length)
            )
            assert covered == list(range(n * world))
            owners = chunk_owners(world, layout)
            assert sorted(owners) == sorted({(r, s) for r, s in owners})
    assert pieces(6, 3, 1, "balanced") == ((3, 0, 3), (12, 3, 3))


def test_boundary_errors_without_a_group():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="layout must be 'contiguous' or 'balanced'"):
        fmd.attention(q, q, q, layout="zigzag")
    with pytest.raises(
        ValueError, match="needs an initialised process group: call torch.distributed.init_process_group"
    ):
        fmd.attention(q, q, q, mask=fm.causal())
    with pytest.raises(ValueError, match="needs an initialised process group"):
        fmd.shard(q, 2)
    with pytest.raises(ValueError, match="q, k and v must be this rank's shards of one sequence, of one length"):
        fmd.attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(TypeError, match="mask must be a flexmask mask"):
        fmd.attention(q, q, q, mask=lambda b, h, i, j: i >= j)
    with pytest.raises(ValueError, match="dim=5 is out of range"):
        fmd.unshard(q, 5)
