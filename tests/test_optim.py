"""Sparse-slot optimizers (docs/design.md §5): exact invariants, lazy Adam, clipping, accumulation, resume."""

import copy
import io

import pytest
import torch
from torch import nn

from smf_lightning.optim import SlotAdam, SlotSGD

N, V = 40, 6


def _sparse_grad(rows, seed, n=N, v=V):
    """An uncoalesced row-sparse gradient like EmbeddingBag(sparse=True) makes (duplicate rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.as_tensor(rows)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(rows.numel(), v, generator=g), (n, v), check_invariants=True)


# Changing selections; the gradient also touches rows that are not selected.
STEPS = [
    ([0, 3, 3, 7, 9, 12, 30], [3, 7]),
    ([1, 3, 5, 7, 7, 7, 22], [1, 7, 22]),
    ([0, 2, 9, 30, 31], [0, 9, 30, 31]),
    ([3, 4, 7, 8], [3]),
    ([5, 6, 12, 13, 39], []),
    ([3, 39, 0], [0, 3, 39]),
]


def _param(seed=0):
    return nn.Parameter(torch.randn(N, V, generator=torch.Generator().manual_seed(seed)))


def _run_invariant(make_opt, sparse):
    p = _param()
    opt = make_opt([p])
    for step, (rows, sel) in enumerate(STEPS):
        g = _sparse_grad(rows, seed=step)
        p.grad = g if sparse else g.to_dense()
        sel = torch.tensor(sel, dtype=torch.long)
        unselected = torch.ones(N, dtype=torch.bool)
        unselected[sel] = False
        before = p.detach().clone()
        state_before = opt.row_state(p, torch.arange(N)) if isinstance(opt, SlotAdam) else None
        opt.step(selection={p: sel})
        opt.zero_grad()
        assert torch.equal(p.detach()[unselected], before[unselected]), f"step {step}: unselected rows moved"
        if sel.numel():
            assert not torch.equal(p.detach()[sel], before[sel]), f"step {step}: selected rows did not move"
        if state_before is not None:
            state_after = opt.row_state(p, torch.arange(N))
            for key in state_before:
                assert torch.equal(state_after[key][unselected], state_before[key][unselected]), key
            assert torch.equal(state_after["step"][sel], state_before["step"][sel] + 1)
    return p, opt


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_grad", "dense_grad"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: SlotSGD(ps, lr=0.5),
        lambda ps: SlotSGD(ps, lr=0.5, weight_decay=0.1),
        lambda ps: SlotAdam(ps, lr=0.1),
        lambda ps: SlotAdam(ps, lr=0.1, weight_decay=0.1, max_grad_norm=0.5),
    ],
    ids=["sgd", "sgd_wd", "adam", "adamw_clip"],
)
def test_unselected_rows_and_their_state_are_bit_identical(make_opt, sparse):
    _run_invariant(make_opt, sparse)


def test_dense_adamw_with_masked_gradients_is_not_sparse():
    """Why these optimizers exist (docs/design.md §5): masked dense AdamW keeps moving old rows."""
    p = _param()
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(N, V)
    p.grad[3] = 1.0  # step 1: only row 3 has a gradient
    opt.step()
    before = p.detach().clone()
    p.grad = torch.zeros(N, V)
    p.grad[7] = 1.0  # step 2: row 3 masked out, yet its momentum moves it again
    opt.step()
    assert not torch.equal(p.detach()[3], before[3])


def test_sgd_selected_rows_match_torch_sgd_exactly():
    p = _param()
    opt = SlotSGD([p], lr=0.3, weight_decay=0.01)
    for step, (rows, sel) in enumerate(STEPS):
        sel = torch.tensor(sel, dtype=torch.long)
        g = _sparse_grad(rows, seed=step)
        ref = nn.Parameter(p.detach()[sel].clone())
        ref.grad = g.to_dense()[sel]
        torch.optim.SGD([ref], lr=0.3, weight_decay=0.01, foreach=False).step()
        p.grad = g.to_dense()
        opt.step(selection={p: sel})
        assert torch.equal(p.detach()[sel], ref.detach())


def test_adam_state_is_lazy_per_row():
    """A row selected at steps 1, 3 and 6 moves exactly as Adam on that row alone for 3 steps."""
    p = _param()
    opt = SlotAdam([p], lr=0.1, betas=(0.8, 0.95), weight_decay=0.05)
    row = 3
    ref = nn.Parameter(p.detach()[row : row + 1].clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.8, 0.95), weight_decay=0.05, foreach=False)
    for step, (rows, sel) in enumerate(STEPS):
        g = _sparse_grad(rows, seed=step)
        p.grad = g
        opt.step(selection={p: torch.tensor(sel, dtype=torch.long)})
        if row in sel:
            ref.grad = g.to_dense()[row : row + 1]
            ref_opt.step()
        assert torch.allclose(p.detach()[row : row + 1], ref.detach(), rtol=1e-6, atol=1e-7)
    state = opt.row_state(p, torch.tensor([row, 8]))
    assert state["step"].tolist() == [3, 0]  # row 8 was never selected: no state at all
    assert torch.allclose(state["exp_avg"][0], ref_opt.state[ref]["exp_avg"][0], rtol=1e-6, atol=1e-8)
    assert torch.equal(state["exp_avg"][1], torch.zeros(V))
    # compact state: one state row per distinct slot ever selected, not N
    distinct = {i for _, sel in STEPS for i in sel}
    assert opt.state[p]["n_rows"] == len(distinct)


def test_adam_with_every_row_selected_matches_adamw():
    p = _param()
    ref = nn.Parameter(p.detach().clone())
    opt = SlotAdam([p], lr=0.01, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(N, V, generator=torch.Generator().manual_seed(step))
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step(selection={p: torch.arange(N)})
        ref_opt.step()
    assert torch.allclose(p, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_cls", [SlotSGD, SlotAdam])
def test_sparse_and_dense_embedding_bag_grads_give_the_same_step(opt_cls):
    torch.manual_seed(0)
    idx = torch.randint(0, N, (8, 5))
    w = torch.rand(8, 5)
    results = []
    for sparse in (True, False):
        bag = nn.EmbeddingBag(N, V, mode="sum", sparse=sparse)
        with torch.no_grad():
            bag.weight.copy_(_param())
        opt = opt_cls([bag.weight], lr=0.1)
        for step in range(3):
            bag(idx, per_sample_weights=w).pow(2).sum().backward()
            assert bag.weight.grad.is_sparse == sparse
            opt.step(selection={bag.weight: idx[step].unique()})
            opt.zero_grad()
        results.append(bag.weight.detach().clone())
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_cls", [SlotSGD, SlotAdam])
def test_gradient_accumulation_sums_micro_batches(opt_cls):
    """Two micro-batch backwards then one step == one step on the summed loss."""
    idx_a, idx_b = torch.tensor([[1, 2, 3], [3, 4, 5]]), torch.tensor([[3, 9, 10]])
    sel = torch.tensor([3, 4, 9])  # chosen from the union of both micro-batches' accesses
    out = []
    for accumulate in (True, False):
        bag = nn.EmbeddingBag(N, V, mode="sum", sparse=True)
        with torch.no_grad():
            bag.weight.copy_(_param())
        opt = opt_cls([bag.weight], lr=0.1)
        if accumulate:
            bag(idx_a).pow(2).sum().backward()
            bag(idx_b).pow(2).sum().backward()
        else:
            (bag(idx_a).pow(2).sum() + bag(idx_b).pow(2).sum()).backward()
        opt.step(selection={bag.weight: sel})
        out.append(bag.weight.detach().clone())
    assert torch.allclose(out[0], out[1], rtol=1e-6, atol=1e-7)


def _clipped(grads, max_norm):
    """What torch.nn.utils.clip_grad_norm_ makes of these gradients."""
    holders = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for h, g in zip(holders, grads):
        h.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(holders, max_norm=max_norm, foreach=False)
    return [h.grad for h in holders]


def test_clip_norm_counts_selected_rows_only():
    p = nn.Parameter(torch.zeros(N, V))  # starting at 0, the step is exactly -lr * clipped grad
    grad = torch.randn(N, V)
    grad[20:] *= 1e6  # huge gradients on rows that are not selected must not shrink the step
    sel = torch.tensor([0, 5, 11])
    ref = _clipped([grad[sel]], max_norm=0.5)
    ref_norm = torch.linalg.vector_norm(grad[sel])
    assert ref_norm > 0.5  # clipping is active
    before = p.detach().clone()
    opt = SlotSGD([p], lr=1.0, max_grad_norm=0.5)
    for g in (grad, grad.to_sparse(sparse_dim=1)):  # dense and sparse give the same clipped step
        with torch.no_grad():
            p.copy_(before)
        p.grad = g
        opt.step(selection={p: sel})
        assert opt.last_grad_norm == pytest.approx(float(ref_norm), rel=1e-6)
        assert torch.equal(before[sel] - p.detach()[sel], ref[0])
        assert torch.linalg.vector_norm(before[sel] - p.detach()[sel]) == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(p.grad.to_dense(), grad)  # the gradient itself is not modified


def test_clip_norm_is_global_over_parameters():
    a, b = nn.Parameter(torch.zeros(N, V)), nn.Parameter(torch.zeros(N, V))  # exact differences
    ga, gb = torch.randn(N, V), torch.randn(N, V)
    sa, sb = torch.tensor([1, 2]), torch.tensor([7])
    ref = _clipped([ga[sa], gb[sb]], max_norm=0.1)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = ga, gb
    SlotSGD([a, b], lr=1.0, max_grad_norm=0.1).step(selection={a: sa, b: sb})
    assert torch.equal(a0[sa] - a.detach()[sa], ref[0])
    assert torch.equal(b0[sb] - b.detach()[sb], ref[1])


@pytest.mark.parametrize("opt_cls", [SlotSGD, SlotAdam])
def test_state_dict_round_trip_resumes_identically(opt_cls):
    p = _param()
    opt = opt_cls([p], lr=0.1, weight_decay=0.01)
    for step, (rows, sel) in enumerate(STEPS[:4]):
        p.grad = _sparse_grad(rows, seed=step)
        opt.step(selection={p: torch.tensor(sel, dtype=torch.long)})
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    p2 = nn.Parameter(p.detach().clone())
    opt2 = opt_cls([p2], lr=999.0)  # hyperparameters come back from the state dict
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in opt.state[p].items():
        other = opt2.state[p2][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
        if torch.is_tensor(value):
            assert other.dtype == value.dtype, key  # integer state stays integer
    for step, (rows, sel) in enumerate(STEPS[4:], start=4):
        g = _sparse_grad(rows, seed=step)
        sel = torch.tensor(sel, dtype=torch.long)
        p.grad, p2.grad = g, g.clone()
        opt.step(selection={p: sel})
        opt2.step(selection={p2: sel})
        assert torch.equal(p, p2)


def test_selection_errors_say_what_to_do():
    p, q = _param(0), _param(1)
    opt = SlotSGD([p, q], lr=0.1)
    p.grad = torch.randn(N, V)
    with pytest.raises(RuntimeError, match="set_selection"):
        opt.step()
    with pytest.raises(ValueError, match="missing 1 parameter"):
        opt.set_selection({p: torch.tensor([1])})
    with pytest.raises(ValueError, match="table has 40 rows"):
        opt.set_selection({p: torch.tensor([40]), q: torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_selection({_param(2): torch.tensor([1]), p: torch.tensor([1]), q: torch.tensor([1])})
    with pytest.raises(ValueError, match="2-D value tables"):
        SlotAdam([nn.Parameter(torch.zeros(5))])
    # the selection is consumed by the step: a second step needs a new one
    opt.set_selection({p: torch.tensor([1, 1, 2]), q: torch.tensor([], dtype=torch.long)})
    q0 = q.detach().clone()
    opt.step()
    assert torch.equal(q, q0)
    with pytest.raises(RuntimeError, match="set_selection"):
        opt.step()
    opt.zero_grad()
    assert opt.step() is None  # no gradients at all (skipped training step): a no-op


def test_lightning_drives_the_optimizer_via_on_before_optimizer_step(tmp_path):
    """Automatic optimization with gradient accumulation: only selected rows ever change."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(N, V, mode="sum", sparse=True)
            self.counts = torch.zeros(N, dtype=torch.long)
            self.selected = []

        def training_step(self, batch, _):
            (idx,) = batch
            self.counts += torch.bincount(idx.reshape(-1), minlength=N)  # union over micro-batches
            return self.bag(idx).pow(2).mean()

        def on_before_optimizer_step(self, optimizer):
            sel = torch.topk(self.counts, 2).indices
            self.selected.append(sel)
            optimizer.set_selection({self.bag.weight: sel})
            self.counts.zero_()

        def configure_optimizers(self):
            return SlotAdam([self.bag.weight], lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, N, (8, 2, 3)))
    model = Tiny()
    w0 = model.bag.weight.detach().clone()
    trainer = L.Trainer(
        max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    assert len(model.selected) == 4  # 8 batches / 2 accumulated
    ever = torch.unique(torch.cat(model.selected))
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ever] = False
    assert torch.equal(model.bag.weight.detach()[untouched], w0[untouched])
    assert not torch.equal(model.bag.weight.detach()[ever], w0[ever])


# ---- precision (docs/usage.md "Scaling out") ---------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [lambda p: SlotAdam(p, lr=1e-3), lambda p: SlotSGD(p, lr=0.5)], ids=["adam", "sgd"])
def test_bf16_table_is_updated_in_fp32_and_rounded_once(make_opt):
    """A bfloat16 table's step equals the float32 step on the same numbers, rounded to bf16 once;
    SlotAdam's moments stay float32, also through a state_dict round trip."""
    g = torch.Generator().manual_seed(0)
    w16 = nn.Parameter(torch.randn(32, 8, generator=g).to(torch.bfloat16))
    w32 = nn.Parameter(w16.detach().float())
    ids = torch.tensor([1, 5, 9])
    opt16, opt32 = make_opt([w16]), make_opt([w32])
    for _ in range(3):
        grad = torch.randn(32, 8, generator=g).to(torch.bfloat16)
        w16.grad, w32.grad = grad.clone(), grad.float()
        opt16.step(selection={w16: ids})
        opt32.step(selection={w32: ids})
        assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))
        w32.data.copy_(w16.detach().float())  # the reference continues from the rounded table
    if isinstance(opt16, SlotAdam):
        assert opt16.state[w16]["exp_avg_sq"].dtype == torch.float32
        buf = io.BytesIO()
        torch.save(opt16.state_dict(), buf)
        fresh = SlotAdam([w16], lr=1e-3)
        fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        assert fresh.state[w16]["exp_avg"].dtype == torch.float32
        assert torch.equal(fresh.state[w16]["exp_avg_sq"], opt16.state[w16]["exp_avg_sq"])


def test_reduce_grad_rows_sees_the_selected_rows_before_clipping():
    w = nn.Parameter(torch.zeros(16, 4))
    opt = SlotSGD([w], lr=1.0, max_grad_norm=10.0)
    seen = []
    opt.reduce_grad_rows = lambda rows: seen.append(rows.clone()) or rows * 0.5  # e.g. a mean over 2 ranks
    w.grad = torch.zeros(16, 4)
    w.grad[3] = 1.0
    opt.step(selection={w: torch.tensor([3, 7])})
    assert len(seen) == 1 and seen[0].shape == (2, 4) and torch.equal(seen[0][0], torch.ones(4))
    assert opt.last_grad_norm == pytest.approx(1.0)  # the norm of the reduced rows: 0.5 * ||(1,1,1,1)||
    assert torch.equal(w.detach()[3], torch.full((4,), -0.5)) and not w.detach()[7].any()
