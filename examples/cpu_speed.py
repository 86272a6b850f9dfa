"""flexmask on CPU against PyTorch's SDPA with a dense mask of the same pattern: inference and training.

On CPU ``fm.attention`` runs its exact reference backend. This times it beside
``torch.nn.functional.scaled_dot_product_attention`` given the equivalent dense mask (bool, or a
float mask holding causal + ALiBi), alternating the two so that other load hits both alike, and
prints the median of the paired time ratios (flexmask / SDPA; lower is faster).

Usage:
    python examples/cpu_speed.py [--lengths 512,1024,2048,4096] [--reps 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import flexmask as fm

B, H, D, WINDOW = 1, 8, 64, 256


def cases(n: int):
    """(name, flexmask mask, flexmask bias, SDPA's dense mask) for length ``n``."""
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    causal = j <= i
    alibi = (fm.alibi(H).slopes().view(H, 1, 1) * (j - i)).masked_fill(~causal, -math.inf)[None]
    yield "causal", fm.causal(), None, causal
    yield "window", fm.causal() & fm.sliding_window(WINDOW), None, causal & (j > i - WINDOW)
    yield "alibi", fm.causal(), fm.alibi(H), alibi


def paired(first, second, reps: int) -> tuple[float, float, float]:
    """Medians of the two times and of their ratio ``second / first``, over alternating runs."""
    first(), second()
    t1, t2 = [], []
    for _ in range(reps):
        for fn, times in ((first, t1), (second, t2)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t1), statistics.median(t2), statistics.median(b / a for a, b in zip(t1, t2, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048,4096", help="comma-separated sequence lengths")
    p.add_argument("--reps", type=int, default=7, help="timed runs of each (default 7)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={B}, H={H}, D={D}, float32")
    print(f"{'case':8} {'N':>5} {'mode':6} {'SDPA s':>9} {'flexmask s':>11} {'ratio':>6}")
    for n in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        grad_out = torch.randn(B, H, n, D, generator=g)
        for name, mask, bias, dense in cases(n):
            for mode in ("infer", "train"):
                qg, kg, vg = (t.clone().requires_grad_(mode == "train") for t in (q, k, v))

                def sdpa(qg=qg, kg=kg, vg=vg, dense=dense, mode=mode, grad_out=grad_out):
                    with torch.set_grad_enabled(mode == "train"):
                        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense)
                        if mode == "train":
                            out.backward(grad_out)

                def flexmask(qg=qg, kg=kg, vg=vg, mask=mask, bias=bias, mode=mode, grad_out=grad_out):
                    with torch.set_grad_enabled(mode == "train"):
                        out = fm.attention(qg, kg, vg, mask=mask, bias=bias)
                        if mode == "train":
                            out.backward(grad_out)

                t_sdpa, t_fm, ratio = paired(sdpa, flexmask, args.reps)
                print(f"{name:8} {n:5d} {mode:6} {t_sdpa:9.4f} {t_fm:11.4f} {ratio:6.2f}", flush=True)


if __name__ == "__main__":
    main()
