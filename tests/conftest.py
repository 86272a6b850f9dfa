"""Shared pytest configuration: GPU tests skip without CUDA; per-test random generators."""

from __future__ import annotations

import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU ``torch.Generator`` with a seed of its own for every test (and parameter set)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g
