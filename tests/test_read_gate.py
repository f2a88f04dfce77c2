"""The read gate (memory/layer.py, docs/design.md §2): write keys, which reads pass, what SMF writes into
the keys, checkpoints and fingerprints. Tiny model, exact invariants, seconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.models.tiny import tiny_qwen2
from smf_lightning.selection.background import BackgroundStats, fingerprint_model
from smf_lightning.selection.selectors import loss_position_mask

SMALL = dict(n_slots=64, heads=2, knn=4, k_dim=16)


def _mem(gate=0.5, **kw):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[1], read_gate=gate, **{**SMALL, **kw}))
    return model, memory_layers(model)[1]


def _queries(mem, x):
    B, T, _ = x.shape
    return F.normalize(mem.query_halves(x).reshape(B, T, mem.heads, mem.k_dim), dim=-1)


@pytest.mark.parametrize("bad", [1.5, -2.0])
def test_read_gate_is_a_cosine_threshold(bad):
    with pytest.raises(ValueError, match="read_gate"):
        MemoryConfig(read_gate=bad).validate()


def test_read_gate_needs_additive_memory():
    with pytest.raises(ValueError, match="read_gate needs memory.mode=additive"):
        MemoryConfig(read_gate=0.3, mode="replace").validate()


def test_without_write_keys_the_gate_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    _, gated = _mem(gate=0.3)
    _, plain = _mem(gate=None)
    with torch.no_grad():
        values = torch.randn_like(plain.values.weight)
        gated.values.weight.copy_(values)
        plain.values.weight.copy_(values)
        assert torch.equal(gated(x), plain(x))
    assert torch.equal(gated.last_access.weights, plain.last_access.weights)
    assert not hasattr(plain, "write_keys")


def test_a_read_passes_exactly_when_its_query_is_close_to_the_rows_write_key():
    torch.manual_seed(0)
    tau = 0.5
    _, mem = _mem(gate=tau)
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        idx, w = mem.lookup(x)
        q = _queries(mem, x)
        # position 0's reads write the keys of the rows it read: key = w * q_0 per head
        rows = torch.unique(idx[0, 0])
        mem.add_writes(rows, *mem.write_delta(rows, idx[0, :1], w[0, :1], q[0, :1]))
        mem(x)
    got = mem.last_access.weights
    expected = w.clone()
    dropped = 0
    for t in range(12):
        for h in range(mem.heads):
            for k in range(mem.knn):
                slot = idx[0, t, h, k]
                key = mem.write_keys[slot, h]
                if mem.write_mass[slot, h] > 0:
                    cos = float(key @ q[0, t, h] / key.norm())
                    if cos < tau:
                        expected[0, t, h, k] = 0.0
                        dropped += 1
    assert torch.equal(got, expected)
    assert torch.equal(got[0, 0], w[0, 0])  # the writer's own reads all pass
    assert dropped > 0  # other positions reading its rows with other queries are cut


def _smf(model, **cfg):
    from smf_lightning.methods import SparseMemoryFinetune

    bg = {1: BackgroundStats.empty(64)}
    bg[1].add_batch(torch.bincount(torch.arange(0, 64, 3), minlength=64))
    base = {"selector": "kl", "top_t": 6, "optimizer": "adam", "lr": 0.1, "prefix_cache": 0}
    return SparseMemoryFinetune(model, {**base, **cfg}, background=bg)


def _batch(tok):
    from smf_lightning.data.facts import collate_examples, encode_example, make_templates

    tmpl = make_templates({"qa": "Question: {question}\nAnswer: {answer}\n"})
    ex = [encode_example(tok, tmpl["qa"], q, a, "answer", fid)
          for fid, q, a in (("f1", "Who wrote Hamlet?", "Shakespeare"), ("f2", "What is 2+2?", "four"))]
    return collate_examples(ex, pad_id=1)


def _step(module, batch):
    opt = module.configure_optimizers()
    wrap = SimpleNamespace(optimizer=opt, step=opt.step)
    opt.zero_grad(set_to_none=True)
    module.on_accumulation_start()
    module.lm_loss(batch).backward()
    module.after_backward(batch)
    module.take_optimizer_step(wrap)


@pytest.mark.parametrize("loss_tokens_only", [True, False])
def test_an_smf_step_writes_its_counted_reads_into_the_keys_of_the_rows_it_updated(tiny_tok, loss_tokens_only):
    """method.loss_tokens_only: the answer positions' reads (true) or every padding-free position's
    (false: the question's tokens too) are counted for selection and written into the keys."""
    model, mem = _mem(gate=0.3)
    module = _smf(model, loss_tokens_only=loss_tokens_only)
    batch = _batch(tiny_tok)
    _step(module, batch)
    acc = mem.last_access
    sel = module.last_selection[1]
    assert sel.numel() > 0
    loss_keep = acc.mask(loss_position_mask(batch["labels"]))
    keep = loss_keep if loss_tokens_only else acc.mask(None)
    assert keep.sum() == (loss_keep.sum() if loss_tokens_only else batch["attention_mask"].sum())
    assert loss_tokens_only or keep.sum() > loss_keep.sum()
    idx, w, q = acc.indices[keep], acc.weights[keep], acc.queries[keep]  # [P, H, K], [P, H, k_dim]
    assert torch.equal(module.last_counts[1], torch.bincount(idx.reshape(-1), minlength=64))
    mass = torch.zeros(64, mem.heads)
    keys = torch.zeros(64, mem.heads, mem.k_dim)
    for p in range(idx.shape[0]):
        for h in range(mem.heads):
            for k in range(mem.knn):
                slot = int(idx[p, h, k])
                if slot in set(sel.tolist()):
                    mass[slot, h] += w[p, h, k]
                    keys[slot, h] += w[p, h, k] * q[p, h]
    torch.testing.assert_close(mem.write_mass, mass, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mem.write_keys, keys, rtol=1e-6, atol=1e-7)
    written = torch.nonzero(mem.write_mass.sum(1) > 0).squeeze(1)
    assert set(written.tolist()) <= set(sel.tolist())  # only updated rows get a key


def test_write_keys_survive_a_checkpoint(tiny_tok):
    model, mem = _mem(gate=0.3)
    module = _smf(model)
    _step(module, _batch(tiny_tok))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any("write_keys" in k for k in ckpt["state_dict"])  # buffers: only in the checkpoint's own entry
    model2, mem2 = _mem(gate=0.3)
    module2 = _smf(model2)
    module2.on_load_checkpoint(ckpt)
    assert torch.equal(mem2.write_keys, mem.write_keys) and torch.equal(mem2.write_mass, mem.write_mass)


def test_a_gate_without_keys_keeps_the_ungated_fingerprint_and_keys_change_it():
    gated, mem = _mem(gate=0.3)
    plain, _ = _mem(gate=None)
    assert fingerprint_model(gated) == fingerprint_model(plain)  # same reads, same caches
    rows = torch.tensor([3])
    mem.add_writes(rows, torch.ones(1, mem.heads, mem.k_dim), torch.ones(1, mem.heads))
    assert fingerprint_model(gated) != fingerprint_model(plain)


def test_read_gate_runs_end_to_end_from_the_config(tmp_path):
    import json

    from test_train import TINY, cli

    res = cli([*TINY, f"hydra.run.dir={tmp_path}", "model.memory.read_gate=0.3"])
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] > 0


# ---- the serving gate (memory.serve_gate): another threshold in eval mode ------------------------
def test_serve_gate_needs_a_read_gate_and_is_a_cosine():
    with pytest.raises(ValueError, match="serve_gate=0.9 needs a read gate"):
        MemoryConfig(serve_gate=0.9).validate()
    with pytest.raises(ValueError, match="serve_gate"):
        MemoryConfig(read_gate=0.5, serve_gate=1.5).validate()
    MemoryConfig(read_gate=0.5, serve_gate=0.9).validate()


def _keyed_pair(tau_train: float, tau_serve: float):
    """Two memories with the same rows, values and write keys: one that answers at ``tau_serve``
    (serve_gate), one whose only gate is ``tau_serve``, and the input that wrote the keys."""
    torch.manual_seed(0)
    x = torch.randn(1, 12, 64)
    _, served = _mem(gate=tau_train, serve_gate=tau_serve)
    _, strict = _mem(gate=tau_serve)
    with torch.no_grad():
        values = torch.randn_like(served.values.weight)
        idx, w = served.lookup(x)
        q = _queries(served, x)
        rows = torch.unique(idx[0, :3])
        delta = served.write_delta(rows, idx[0, :3], w[0, :3], q[0, :3])
        for m in (served, strict):
            m.values.weight.copy_(values)
            m.add_writes(rows, *delta)
    return served, strict, x


def test_in_eval_mode_the_serving_gate_decides_and_in_training_the_read_gate():
    from smf_lightning.memory.layer import training_gate

    served, strict, x = _keyed_pair(0.1, 0.9)
    _, loose = _mem(gate=0.1)
    with torch.no_grad():
        loose.values.weight.copy_(served.values.weight)
        loose.add_writes(torch.arange(64), served.write_keys.clone(), served.write_mass.clone())
        for m in (served, strict, loose):
            m.eval()
        assert served.gate_threshold() == 0.9
        assert torch.equal(served(x), strict(x))  # eval mode: the serving threshold
        assert torch.equal(served.last_access.weights, strict.last_access.weights)
        with training_gate([served]):  # a training forward in eval mode (SMF's selection)
            assert served.gate_threshold() == 0.1
            assert torch.equal(served(x), loose(x))
        assert served.gate_threshold() == 0.9  # restored
        served.train()
        loose.train()
        assert served.gate_threshold() == 0.1
        assert torch.equal(served(x), loose(x))  # train mode: the read gate
        # the two thresholds pass different reads here, or the checks above would prove nothing
        loose(x)
        strict(x)
        assert not torch.equal(loose.last_access.weights, strict.last_access.weights)


def test_a_serving_gate_without_keys_keeps_the_fingerprint_and_with_keys_changes_it():
    gated, mem = _mem(gate=0.3)
    served, smem = _mem(gate=0.3, serve_gate=0.9)
    assert fingerprint_model(served) == fingerprint_model(gated)  # no keys: the gate is the identity
    rows = torch.tensor([3])
    for m in (mem, smem):
        m.add_writes(rows, torch.ones(1, m.heads, m.k_dim), torch.ones(1, m.heads))
    assert fingerprint_model(served) != fingerprint_model(gated)  # with keys, it answers differently


def test_training_is_the_same_whatever_the_serving_gate(tmp_path):
    """Two tiny runs, read gate 0.3, one answering at 0.99: the same rows, values and write keys
    after training (the serving gate only decides in eval mode), and the run's config carries it."""
    from test_train import TINY, cli

    ckpts = {}
    for name, extra in (("plain", []), ("served", ["model.memory.serve_gate=0.99"])):
        res = cli([*TINY, f"hydra.run.dir={tmp_path / name}", "logger.wandb.mode=disabled", "callbacks.plots=false",
                   "model.memory.read_gate=0.3", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        ckpts[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    a, b = ckpts["plain"], ckpts["served"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["write_keys"].keys() == b["write_keys"].keys() and a["write_keys"]
    for i in a["write_keys"]:
        assert all(torch.equal(x, y) for x, y in zip(a["write_keys"][i], b["write_keys"][i]))
        assert a["write_keys"][i][0].numel() > 0
    assert "serve_gate: 0.99" in (tmp_path / "served" / ".hydra" / "config.yaml").read_text()
