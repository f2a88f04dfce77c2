"""method.skip_frequent_tokens (selection/frequent.py): which tokens are skipped, and that their
positions neither count for SMF's selection nor write read-gate keys. Tiny model, exact invariants."""

from __future__ import annotations

import pytest
import torch

from smf_lightning.selection.frequent import frequent_tokens, token_counts, writing_positions


def test_token_counts_count_real_positions_only():
    batches = [{"input_ids": torch.tensor([[1, 2, 2, 0], [3, 3, 3, 1]]),
                "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}]
    assert token_counts(batches, 5).tolist() == [0, 2, 2, 3, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_counts(batches, 3)


def test_the_fewest_most_frequent_tokens_that_reach_the_share():
    counts = torch.tensor([5, 40, 0, 30, 5, 20])  # total 100
    assert frequent_tokens(counts, 0.0).sum() == 0
    assert torch.nonzero(frequent_tokens(counts, 0.4)).squeeze(1).tolist() == [1]  # 40 reaches 40%
    assert torch.nonzero(frequent_tokens(counts, 0.41)).squeeze(1).tolist() == [1, 3]  # 70
    assert torch.nonzero(frequent_tokens(counts, 0.92)).squeeze(1).tolist() == [0, 1, 3, 5]  # 95: the lower id of a tie
    with pytest.raises(ValueError):
        frequent_tokens(counts, 1.0)


def test_writing_positions_drop_skipped_tokens_from_the_base_mask():
    ids = torch.tensor([[4, 1, 2, 1]])
    skipped = torch.tensor([False, True, False, False, False])
    assert writing_positions(ids, None, None) is None
    assert writing_positions(ids, skipped, None).tolist() == [[True, False, True, False]]
    base = torch.tensor([[False, True, True, True]])
    assert writing_positions(ids, skipped, base).tolist() == [[False, False, True, False]]


def _write_keys_of(module, mem, keep: torch.Tensor) -> torch.Tensor:
    """The write keys the step's selected rows should hold: the read-weighted queries of the
    positions ``keep`` allows, summed per row and head."""
    acc, sel = mem.last_access, set(module.last_selection[1].tolist())
    keys = torch.zeros(64, mem.heads, mem.k_dim)
    idx, w, q = acc.indices[keep], acc.weights[keep], acc.queries[keep]
    for p in range(idx.shape[0]):
        for h in range(mem.heads):
            for k in range(mem.knn):
                if int(idx[p, h, k]) in sel:
                    keys[int(idx[p, h, k]), h] += w[p, h, k] * q[p, h]
    return keys


def test_skipped_positions_neither_count_nor_write_keys(tiny_tok):
    """An SMF step with the tokens of one position skipped: the step's counts are the reads of the
    other positions only, and no write key holds a query of a skipped position."""
    from test_read_gate import _batch, _mem, _smf, _step

    batch = _batch(tiny_tok)
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool()
    skipped = torch.zeros(int(ids.max()) + 1, dtype=torch.bool)
    skipped[int(ids[0, 1])] = True  # a question token of the first fact (and wherever it recurs)
    skipped[int(ids[1, 2])] = True
    keep = real & ~skipped[ids]
    assert 0 < int(keep.sum()) < int(real.sum())

    model, mem = _mem(gate=0.3)
    module = _smf(model, loss_tokens_only=False)
    module.set_skipped_tokens(skipped)
    _step(module, batch)
    acc = mem.last_access
    assert torch.equal(module.last_counts[1], torch.bincount(acc.indices[keep].reshape(-1), minlength=64))
    torch.testing.assert_close(mem.write_keys, _write_keys_of(module, mem, keep), rtol=1e-6, atol=1e-7)

    # nothing skipped: the plain step (every real position counts)
    model2, mem2 = _mem(gate=0.3)
    plain = _smf(model2, loss_tokens_only=False)
    plain.set_skipped_tokens(torch.zeros_like(skipped))
    assert plain.skipped_tokens is None
    _step(plain, batch)
    assert torch.equal(plain.last_counts[1], torch.bincount(mem2.last_access.indices[real].reshape(-1), minlength=64))


def test_context_prefix_positions_neither_count_nor_write_keys(tiny_tok):
    """A batch's write_mask (data.prefixes: a context prefix before the prompt) keeps its positions
    out of the step's slot counts and write keys, as a skipped token is kept out."""
    from test_read_gate import _batch, _mem, _smf, _step

    batch = _batch(tiny_tok)
    real = batch["attention_mask"].bool()
    allowed = real.clone()
    allowed[:, :3] = False  # the first three tokens of every sequence: a "prefix"
    batch["write_mask"] = allowed
    model, mem = _mem(gate=0.3)
    module = _smf(model, loss_tokens_only=False)
    _step(module, batch)
    acc = mem.last_access
    assert torch.equal(module.last_counts[1], torch.bincount(acc.indices[allowed].reshape(-1), minlength=64))
    torch.testing.assert_close(mem.write_keys, _write_keys_of(module, mem, allowed), rtol=1e-6, atol=1e-7)


def test_skip_frequent_tokens_is_a_share(tmp_path):
    from test_train import TINY, cli

    res = cli([*TINY, f"hydra.run.dir={tmp_path}", "method.skip_frequent_tokens=1.5"])
    assert res.returncode == 2 and "method.skip_frequent_tokens" in res.stdout + res.stderr


def test_a_tiny_run_skips_the_backgrounds_frequent_tokens(tmp_path):
    from test_train import TINY, cli

    res = cli([*TINY, f"hydra.run.dir={tmp_path}", "logger.wandb.mode=disabled", "callbacks.plots=false",
               "model.memory.read_gate=0.3", "method.skip_frequent_tokens=0.3"])
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").is_file() else res.stderr
    assert "method.skip_frequent_tokens=0.3:" in log
