"""Data-parallel SMF on this CPU: 2 processes, gloo, ``strategy=ddp_spawn`` (docs/usage.md "Scaling out").

Never ``strategy=ddp`` inside pytest: Lightning's ``ddp`` launcher re-runs ``sys.argv`` (the
pytest command) in every rank. ``ddp_spawn`` pickles the Trainer's module and callbacks into
fresh processes; the ranks report through files in ``tmp_path``.

The invariants (selection/distributed.py):
- after every optimizer step the selected slot ids and the value tables are identical on both
  ranks (gathered and compared with ``torch.equal``), although each rank trained on a
  different shard of the step's data;
- a 2-process run with per-rank batch b takes the same steps as a 1-process run with batch 2b:
  the same selected ids (exactly: integer counts summed over ranks are the counts of the whole
  batch) and the same value tables up to float32 summation order (see the test).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist

from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.methods import SparseMemoryFinetune
from smf_lightning.models.tiny import TINY_VOCAB, tiny_qwen2
from smf_lightning.selection.background import BackgroundStats

N_SLOTS = 256
SEQ, ANSWER = 12, 3  # every row: 12 tokens, the loss on its last 3 (equal loss tokens per shard)


def _batches(n_batches: int, rows: int, seed: int = 0) -> list[dict]:
    """Random token rows without padding, answer-only labels: every batch has rows * ANSWER loss
    tokens, so a rank's mean loss over its shard weighs each token as the whole batch's mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, TINY_VOCAB, (rows, SEQ), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER:] = ids[:, -ANSWER:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class InOrderBatches(L.LightningDataModule):
    """Ready-made batches, each rank taking every world_size-th one in order (batch k·W + r at
    step k on rank r), as FactStreamDataModule does: Lightning's own distributed sampler would
    shuffle a training loader's order."""

    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        t = self.trainer
        sampler = DistributedSampler(self.batches, num_replicas=t.world_size, rank=t.global_rank, shuffle=False)
        return DataLoader(self.batches, batch_size=None, sampler=sampler)


def _concat_pairs(batches: list[dict]) -> list[dict]:
    """Batch 2k and 2k+1 as one batch of twice the rows: what the two ranks see at step k."""
    return [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches[::2], batches[1::2])]


def _module(selector: str, optimizer: str, lr: float, read_gate: float | None = None) -> SparseMemoryFinetune:
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1, 2], n_slots=N_SLOTS, heads=2, knn=4, k_dim=16,
                                                read_gate=read_gate))
    bg = {}
    for i in (1, 2):
        bg[i] = BackgroundStats.empty(N_SLOTS)
        bg[i].add_batch(torch.bincount(torch.arange(0, N_SLOTS, 3), minlength=N_SLOTS))
    cfg = {"selector": selector, "top_t": 8, "optimizer": optimizer, "lr": lr, "select_per": "step", "prefix_cache": 0}
    return SparseMemoryFinetune(model, cfg, background=bg, seed=0)


class RecordSteps(L.Callback):
    """After every optimizer step: this rank's selection and value tables; with 2 ranks also
    both ranks' selections, tables and input batches gathered, compared on rank 0."""

    def __init__(self, out: str):
        self.out = out
        self.steps: list[dict] = []

    def setup(self, trainer, module, stage) -> None:
        torch.set_num_threads(1)  # 2 ranks on a shared 2-core machine

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        rec = {
            "selection": {i: s.clone() for i, s in module.last_selection.items()},
            "values": {i: m.values.weight.detach().clone() for i, m in module.memories.items()},
            "write_keys": {i: m.write_keys.clone() for i, m in module.memories.items() if hasattr(m, "write_keys")},
        }
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, {"rec": rec, "input_ids": batch["input_ids"].cpu()})
            rec["ranks"] = gathered
        self.steps.append(rec)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            torch.save(self.steps, self.out)


@pytest.fixture(autouse=True)
def _share_tensors_through_files():
    """ddp_spawn pickles the module into its processes through torch.multiprocessing. On this
    sandbox the default file-descriptor passing fails for a whole LightningModule ("unable to
    resize file ... Invalid argument"), while named shared-memory files work."""
    import torch.multiprocessing as mp

    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    yield
    mp.set_sharing_strategy(before)


def _fit(module, batches: list[dict], devices: int, out: str) -> list[dict]:
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[RecordSteps(out)],
    )
    trainer.fit(module, datamodule=InOrderBatches(batches))
    return torch.load(out, weights_only=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("selector", ["kl", "random"])
def test_ranks_select_the_same_slots_and_keep_identical_tables(selector, tmp_path):
    steps = _fit(_module(selector, "adam", 0.1), _batches(6, rows=2), devices=2, out=str(tmp_path / "steps.pt"))
    assert len(steps) == 3  # 6 batches over 2 ranks
    changed = 0
    for k, step in enumerate(steps):
        r0, r1 = step["ranks"]
        assert not torch.equal(r0["input_ids"], r1["input_ids"])  # each rank trained on its own shard
        for i in (1, 2):
            a, b = r0["rec"]["selection"][i], r1["rec"]["selection"][i]
            assert 0 < a.numel() <= 8
            assert torch.equal(a, b), (k, i)
            assert torch.equal(r0["rec"]["values"][i], r1["rec"]["values"][i]), (k, i)
            before = steps[k - 1]["values"][i] if k else torch.zeros_like(step["values"][i])
            moved = torch.nonzero((step["values"][i] != before).any(1)).squeeze(1)
            assert set(moved.tolist()) <= set(a.tolist())  # only selected rows moved ...
            changed += moved.numel()
    assert changed > 0  # ... and some did


@pytest.mark.timeout(120)
def test_ranks_keep_identical_write_keys_with_a_read_gate(tmp_path):
    """Each rank's loss reads go into the keys of the (common) selected rows, summed over ranks."""
    steps = _fit(_module("kl", "adam", 0.1, read_gate=0.3), _batches(6, rows=2), devices=2,
                 out=str(tmp_path / "steps.pt"))
    for k, step in enumerate(steps):
        r0, r1 = step["ranks"]
        for i in (1, 2):
            assert torch.equal(r0["rec"]["write_keys"][i], r1["rec"]["write_keys"][i]), (k, i)
            assert torch.equal(r0["rec"]["values"][i], r1["rec"]["values"][i]), (k, i)
    assert any(bool(step["write_keys"][i].any()) for step in steps for i in (1, 2))


@pytest.mark.timeout(120)
def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(tmp_path):
    """SlotSGD, batch b = 2 rows per rank vs 4 rows in one process, 3 steps.

    Selected ids: exactly equal (integer counts). Values: SGD moves a row by -lr * its mean
    gradient; both runs average the same per-token gradients (each shard has the same number
    of loss tokens, so the mean over ranks of per-shard means is the whole batch's mean) but
    sum them in a different order and scale them at a different point (per shard, then / 2),
    so float32 rounding differs: rtol 1e-5 (about 100 float32 ulps) and atol 1e-7 (rows near 0).
    SlotAdam is not compared: its first steps are ~lr * sign(gradient), so a gradient coordinate
    that is ~0 can flip sign under rounding and move a coordinate by 2 * lr."""
    batches = _batches(6, rows=2, seed=1)
    two = _fit(_module("kl", "sgd", 50.0), batches, devices=2, out=str(tmp_path / "two.pt"))
    one = _fit(_module("kl", "sgd", 50.0), _concat_pairs(batches), devices=1, out=str(tmp_path / "one.pt"))
    assert len(one) == len(two) == 3
    for k, (a, b) in enumerate(zip(one, two)):
        for i in (1, 2):
            assert torch.equal(a["selection"][i], b["selection"][i]), (k, i)
            assert a["selection"][i].numel() > 0
            torch.testing.assert_close(b["values"][i], a["values"][i], rtol=1e-5, atol=1e-7)
    assert any(bool((one[-1]["values"][i] != 0).any()) for i in (1, 2))  # the tables did train


def test_single_process_path_is_unchanged_without_a_process_group():
    from smf_lightning.selection import distributed

    assert not dist.is_initialized() and distributed.world_size() == 1
    counts = torch.tensor([0, 3, 1])
    assert distributed.sum_over_ranks(counts) is counts
    ids = torch.tensor([2, 5])
    assert distributed.broadcast_ids(ids) is ids
    assert distributed.average_rows(ids) is ids


def test_rank_zero_writes_memory_layers_are_unchanged():
    """The module under test really has the two memory layers the DDP tests compare."""
    module = _module("kl", "adam", 0.1)
    assert sorted(memory_layers(module.model)) == [1, 2]
