"""The MQAR example (examples/mqar.py): its data, its selection bookkeeping, and a CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import flexmask as fm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mqar.py"


@pytest.fixture(scope="module")
def mqar():
    spec = importlib.util.spec_from_file_location("mqar_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_hand_built_targets(mqar):
    # keys 0..3, values 4..7, filler 8..11; 2 pairs: (2 -> 5), (0 -> 7); queries from position 6 on
    cfg = mqar.Config(num_pairs=2, num_keys=4, num_values=4, num_filler=4, query_frac=0.5)
    seq = torch.tensor([[2, 5, 0, 7, 9, 8, 10, 0, 11, 2, 8, 9]])
    expected = torch.full_like(seq, -100)
    expected[0, 7], expected[0, 9] = 7, 5
    assert cfg.query_start(seq.shape[1]) == 6
    assert torch.equal(mqar.mqar_targets(seq, 2, 6, 4), expected)
    # a key at a pair position, a value token and filler in the query region are not queries
    seq2 = torch.tensor([[2, 5, 0, 7, 9, 8, 5, 9, 11, 3, 8, 9]])
    assert (mqar.mqar_targets(seq2, 2, 6, 4) == -100).all()


@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_generator_layout(mqar, length):
    cfg = mqar.Config()
    cfg.validate()
    gen = torch.Generator().manual_seed(length)
    inputs, targets, query_pos = mqar.mqar_batch(8, length, cfg, gen)
    p, nk, nv = cfg.num_pairs, cfg.num_keys, cfg.num_values
    assert inputs.shape == targets.shape == (8, length) and query_pos.shape == (8, p)
    keys, values = inputs[:, 0 : 2 * p : 2], inputs[:, 1 : 2 * p : 2]
    assert ((keys >= 0) & (keys < nk)).all() and ((values >= nk) & (values < nk + nv)).all()
    assert all(len(set(row)) == p for row in keys.tolist())  # distinct keys
    is_query = torch.zeros_like(inputs, dtype=torch.bool).scatter_(1, query_pos, True)
    filler = inputs[:, 2 * p :][~is_query[:, 2 * p :]]
    assert ((filler >= nk + nv) & (filler < cfg.vocab_size)).all()
    # every query is the key of pair t, answered by its value, far beyond the reach of the windows
    assert torch.equal(inputs.gather(1, query_pos), keys)
    assert torch.equal(targets.gather(1, query_pos), values)
    assert int((targets != -100).sum()) == 8 * p
    value_pos = 2 * torch.arange(p) + 1
    distance = query_pos - value_pos  # to the value; the key is one further
    assert int(distance.min()) > cfg.layers * (cfg.window - 1)
    assert int(distance.min()) > cfg.window
    assert (query_pos >= cfg.query_start(length)).all()
    # the targets are exactly the definition's
    assert torch.equal(targets, mqar.mqar_targets(inputs, p, cfg.query_start(length), nk))


def test_config_rejects_a_window_that_sees_the_pairs(mqar):
    with pytest.raises(ValueError, match="window could see the pairs"):
        mqar.Config(lengths=[256], window=128).validate()


def test_kept_matches_flexmask_masks(mqar, gen):
    b, h, n, p = 2, 3, 40, 6
    scores = torch.randint(0, 5, (b, h, n), generator=gen).float()  # many ties
    query_pos = torch.randint(0, n, (b, p), generator=gen)
    key_pos = torch.randint(0, n, (b, p), generator=gen)
    for k in (1, 4, 9):
        dense = fm.topk(scores, k).to_dense(n, n)  # [B, H, N, N]
        want = torch.stack([dense[i, :, query_pos[i], key_pos[i]] for i in range(b)])
        assert torch.equal(mqar.kept_by_topk(scores, query_pos, key_pos, k), want)
    for k, bs in ((1, 4), (2, 4), (2, 8), (3, 5)):
        dense = fm.topk_blocks(scores, k, block_size=bs).to_dense(n, n)
        want = torch.stack([dense[i, :, query_pos[i], key_pos[i]] for i in range(b)])
        assert torch.equal(mqar.kept_by_topk_blocks(scores, query_pos, key_pos, k, bs), want)


def test_models_share_their_common_weights(mqar):
    cfg = mqar.smoke_config()
    models = {kind: mqar.RecallModel(kind, cfg) for kind in mqar.KINDS}
    ref = dict(models["mha"].named_parameters())
    for kind, model in models.items():
        params = dict(model.named_parameters())
        extra = {name for name in params if name not in ref}
        dma_only = {f"blocks.{i}.attn.{x}" for i in range(cfg.layers) for x in ("A", "dt_proj.weight", "dt_proj.bias")}
        assert extra == (dma_only if kind.startswith("dma") else set())
        for name, value in ref.items():
            assert torch.equal(params[name], value), (kind, name)
        if kind.startswith("dma"):
            assert all((blk.attn.A == 0).all() for blk in model.blocks)  # starts as the sliding window


def test_smoke_run(mqar, tmp_path):
    results = mqar.main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["config"]["smoke"] is True
    cfg = results["config"]
    assert {(r["kind"], r["length"]) for r in on_disk["runs"]} == {(k, n) for k in cfg["kinds"] for n in cfg["lengths"]}
    assert set(cfg["kinds"]) == set(mqar.KINDS)
    for run in on_disk["runs"]:
        assert run["error"] is None, run
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["steps_done"] == cfg["steps"]
        assert run["curve"] and all(0.0 <= pt["acc"] <= 1.0 for pt in run["curve"])
        if run["kind"].startswith("dma"):
            assert len(run["pair_recall"]) == cfg["layers"]
            assert all(0.0 <= x <= 1.0 for x in run["pair_recall"])
    table = (tmp_path / "mqar.md").read_text()
    for kind in cfg["kinds"]:
        assert mqar.LABELS[kind] in table
    assert (tmp_path / "mqar.png").stat().st_size > 0


def test_a_diverging_run_stops_and_says_so(mqar, monkeypatch):
    """A non-finite training loss ends the run at the next log point, flagged, instead of training on NaNs."""
    real = mqar._loss_and_hits
    calls = []

    def nan_after_three(logits, targets):
        loss, hits, count = real(logits, targets)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 3 else loss), hits, count

    monkeypatch.setattr(mqar, "_loss_and_hits", nan_after_three)
    cfg = mqar.dataclasses.replace(mqar.smoke_config(), steps=40, log_every=5)
    record = mqar.train_one("swa", 64, cfg, None, None)
    assert record["stopped_early"] == "diverged: non-finite training loss by step 5"
    assert record["steps_done"] == 5
