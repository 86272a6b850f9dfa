"""Replaying mask builds from CUDA graphs.

Building a BlockMask or a token layout from content scores is a few dozen to a hundred small
kernels: on an H100 that is host-bound (about 2 ms whatever the length, for about 0.3 ms of GPU
work). A CUDA graph replays them with one launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch

from .cache import graph_store

GRAPHS_PER_BUILDER = 4
"""Most captured graphs kept per builder function (least recently used first out)."""


class CudaGraphed:
    """``fn(x, key) -> tuple of int32 tensors``, replayed from a CUDA graph per (input shape, key).

    ``x`` is copied into the graph's input buffer and the outputs are copied out of the graph's
    memory (one packed copy), so the results of successive calls never alias: every layer of a
    model keeps its own BlockMask until its backward. Each graph keeps its temporaries in a private
    memory pool. A capture that fails (an operation a graph cannot hold) falls back to running
    ``fn`` eagerly for that shape, as do inputs off CUDA, calls inside ``torch.compile`` and calls
    inside the caller's own graph capture. The graphs live in the one cache
    (:func:`flexmask.lowering.cache.graph_store`), keyed by this builder, the input's shape, dtype
    and device, ``key`` and whether inference mode is on.
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x: torch.Tensor, key: Hashable = None) -> tuple[torch.Tensor, ...]:
        if not x.is_cuda or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return self.fn(x, key)
        store = graph_store()
        full_key = (self.fn, tuple(x.shape), x.dtype, x.device, key, torch.is_inference_mode_enabled())
        entry = store.get(full_key)
        if entry is None:
            entry = store[full_key] = self._capture(x, key)
            mine = [k for k in store if k[0] is self.fn]
            for old in mine[: max(0, len(mine) - GRAPHS_PER_BUILDER)]:
                del store[old]
        store.move_to_end(full_key)
        if entry == "eager":
            return self.fn(x, key)
        graph, static_in, packed, shapes = entry
        with torch.cuda.device(x.device):  # replay on x's device, whichever device is current
            static_in.copy_(x)
            graph.replay()
            flat = packed.clone()
        sizes = [math.prod(shape) for shape in shapes]
        return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True))

    def _capture(self, x: torch.Tensor, key: Hashable):
        static_in = x.detach().clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        try:
            with torch.no_grad(), torch.cuda.device(x.device):
                with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, workspaces)
                    self.fn(static_in, key)
                torch.cuda.current_stream(x.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = self.fn(static_in, key)
                    packed = torch.cat([o.reshape(-1) for o in outs])
        except RuntimeError:
            return "eager"
        return graph, static_in, packed, [tuple(o.shape) for o in outs]
