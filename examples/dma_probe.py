"""DMA timing probe used while developing the token-selection layout (needs a CUDA GPU).

Times SDPA causal, DMA token selection (through the key layout), the layout's construction, a
training step with a fresh mask, and DMA block selection, for random and clustered scores; then,
for random scores, where the backward goes: fwd+bwd without the score gradient, with flex's own
(atomic) key-bias gradient, with flexmask's closed form (``flexmask.backends.key_bias``) and, for
blocks, with the fused backward (``flexmask.backends.triton.fused_bwd``, the default there); each
chosen with the option ``key_bias_grad``.
The H100 numbers quoted in docs/benchmarks.md under "development probes" came from this script;
`python -m flexmask bench dma` is the full, side-by-side benchmark.

Usage:
    python examples/dma_probe.py 32768 65536
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import flexmask as fm
from flexmask.lowering.layout import BLOCK, Layout, Lowering
from flexmask.lowering.planner import lower
from flexmask.lowering.token_layout import layout_plan

B, HQ, HKV, D, W = 1, 16, 8, 128, 2048


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def fwd_and_step(fn, grad_out) -> tuple[float, float]:
    return bench(fn), bench(lambda: torch.autograd.backward(fn(), grad_out))


def probe(n: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(B, HQ, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(B, HQ, n, D, device="cuda", dtype=torch.bfloat16)
    layout = Layout(B, HQ, n, n, q.device, HKV)
    low = Lowering(layout, fm.options_in_effect().merged({"backend": "flex", "cache": False}))

    def report(name, *ms):
        print(n, name, [round(x, 3) for x in ms], flush=True)

    report(
        "sdpa fwd, fwd+bwd",
        *fwd_and_step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), go),
    )
    walk = torch.cumsum(torch.randn(B, HKV, n, device="cuda"), -1) / 30
    for kind, s in [("random", torch.randn(B, HKV, n, device="cuda")), ("clustered", walk)]:
        s.requires_grad_()
        mask, bias = fm.topk(s, W), fm.key_bias(s)
        report(
            f"{kind} token fwd, fwd+bwd",
            *fwd_and_step(lambda m=mask, b=bias: fm.attention(q, k, v, mask=m, bias=b), go),
        )
        ends = mask.interval_ends(low)
        plan = layout_plan(ends.reshape(-1, n).long(), BLOCK, W)
        touched = plan["any_"].sum(-1).float().mean().item()
        full = (plan["all_"].sum() / plan["any_"].sum()).item()
        print(f"  layout length {plan['length']}, blocks per query block {touched:.1f}, full {full:.0%}")
        report(
            f"{kind} layout build",
            bench(
                lambda s=s: lower(fm.topk(s, W), None, layout=layout, options=low.options, scale=D**-0.5, softcap=None)
            ),
        )
        report(
            f"{kind} token step with a fresh mask",
            *fwd_and_step(lambda s=s, b=bias: fm.attention(q, k, v, mask=fm.topk(s, W), bias=b), go),
        )
        blocks = fm.topk_blocks(s, W // 128)
        report(
            f"{kind} block fwd, fwd+bwd",
            *fwd_and_step(lambda m=blocks, b=bias: fm.attention(q, k, v, mask=m, bias=b), go),
        )
        if kind == "random":
            backward_split(q, k, v, s, go)
        torch.cuda.empty_cache()


def backward_split(q, k, v, s, go) -> None:
    """fwd+bwd of token and block DMA: flex's backward without the score gradient, with flex's atomics,
    with the closed form; for blocks also the fused Triton backward."""
    n = q.shape[2]
    for name, mask in [("token", fm.topk(s.detach(), W)), ("block", fm.topk_blocks(s.detach(), W // 128))]:
        times = {}
        for label, scores, choice in [
            ("no score grad", s.detach(), "flex"),
            ("atomics", s, "flex"),
            ("closed form", s, "query_side"),
            ("fused backward", s, "fused"),
        ]:
            if choice == "fused" and name != "block":
                continue
            inputs = (q, k, v, scores) if scores.requires_grad else (q, k, v)
            times[label] = bench(
                lambda m=mask, t=scores, i=inputs, c=choice: torch.autograd.grad(
                    fm.attention(q, k, v, mask=m, bias=fm.key_bias(t), options={"key_bias_grad": c}), i, go
                )
            )
        print(n, f"{name} fwd+bwd ms:", {key: round(t, 3) for key, t in times.items()}, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lengths", nargs="*", type=int, default=[32768], help="sequence lengths (default 32768)")
    lengths = parser.parse_args().lengths
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for length in lengths:
        probe(length)
