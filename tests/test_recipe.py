"""The SMF recipe levers (experiments/recipe/RECIPE.md) on the tiny model: direct output, input whitening, hub
exclusion, slot ownership, per-fact selection, fresh optimizer state, interleaved schedule,
and the known-facts suite. Exact invariants, seconds."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from smf_lightning.memory import MemoryConfig, ProductKeyMemory, load_retrofitted, memory_layers, retrofit, save_retrofitted
from smf_lightning.memory.whitening import fit_input_whitening, load_or_fit_input_whitening
from smf_lightning.models.tiny import tiny_qwen2
from smf_lightning.selection.background import BackgroundStats
from smf_lightning.selection.selectors import hub_slots, loss_position_mask, score_slots, select_slots

SMALL = dict(n_slots=64, heads=2, knn=4, k_dim=16)
TEXTS = ["Question: Who wrote Hamlet?\nAnswer: Shakespeare", "The quick brown fox jumps", "Q: 2+2? A: 4"]


def _batches(tok, texts=TEXTS, size=2):
    out = []
    for i in range(0, len(texts), size):
        enc = tok(texts[i:i + size], return_tensors="pt", padding=True)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return out


def _logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# ----------------------------------------------------------------------------- output path


def test_direct_output_is_base_at_init_and_adds_value_rows_to_the_residual(tiny_tok):
    b = _batches(tiny_tok)[0]
    ref = _logits(tiny_qwen2(seed=1), b)
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[1], output="direct", **SMALL))
    mem = memory_layers(model)[1]
    assert mem.gate is None and mem.out is None
    assert torch.equal(_logits(model, b), ref)  # zero values: exactly the base model
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        mem.values.weight.normal_()
        idx, w = mem.lookup(x)
        expected = (w.unsqueeze(-1) * mem.values.weight[idx]).sum((2, 3))  # Σ_heads Σ_knn w · V[slot]
        torch.testing.assert_close(mem(x), expected, rtol=1e-5, atol=1e-5)


def test_direct_output_needs_the_hidden_size_as_value_dim():
    with pytest.raises(ValueError, match="v_dim must be null or the model's hidden size"):
        retrofit(tiny_qwen2(), MemoryConfig(layers=[1], output="direct", v_dim=32, **SMALL))


# ----------------------------------------------------------------------------- whitening


def test_whitening_fits_background_moments_and_changes_only_addressing(tiny_tok, tmp_path):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1, 2], input_norm="whiten", **SMALL))
    batches = _batches(tiny_tok)
    b = batches[0]
    before = _logits(model, b)
    # the memory inputs, collected by hand
    seen = {i: [] for i in (1, 2)}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: seen[i].append(a[0].detach())) for i, m in memory_layers(model).items()]
    for bb in batches:
        with torch.no_grad():
            model(**bb)
    for h in hooks:
        h.remove()
    info = fit_input_whitening(model, batches)
    for i, mem in memory_layers(model).items():
        x = torch.cat([s[m.bool()] for s, m in zip(seen[i], (bb["attention_mask"] for bb in batches))]).double()
        torch.testing.assert_close(mem.in_mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mem.in_std.double(), x.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
        assert info[i]["tokens"] == x.shape[0]
        # the query sees (x - mean) / std; values are still zero, so the model is still the base model
        xq = torch.randn(1, 2, 64)
        manual = mem.query((xq - mem.in_mean) / mem.in_std).view(1, 2, 2, 2, 8)
        torch.testing.assert_close(mem.query_halves(xq), torch.nn.functional.layer_norm(manual, (8,)))
    assert torch.equal(_logits(model, b), before)
    # cached: the second fit does not run the model, and sets the same statistics
    calls = []
    key = {"corpus": "t"}
    load_or_fit_input_whitening(model, lambda: calls.append(1) or batches, tmp_path, key)
    fresh = retrofit(tiny_qwen2(), MemoryConfig(layers=[1, 2], input_norm="whiten", **SMALL))
    load_or_fit_input_whitening(fresh, lambda: calls.append(2) or batches, tmp_path, key)
    assert calls == [1]
    for i in (1, 2):
        assert torch.equal(memory_layers(fresh)[i].in_std, memory_layers(model)[i].in_std)
    # saved with the model: same logits after load, with non-zero values so addressing matters
    with torch.no_grad():
        memory_layers(fresh)[1].values.weight.normal_()
    save_retrofitted(fresh, tmp_path / "m")
    assert torch.equal(_logits(load_retrofitted(tmp_path / "m"), b), _logits(fresh, b))


def test_zca_whitening_is_the_inverse_square_root_of_the_background_covariance(tiny_tok, tmp_path):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="zca", **SMALL))
    mem = memory_layers(model)[1]
    assert torch.equal(mem.in_whiten, torch.eye(64))  # identity until fitted
    batches = _batches(tiny_tok, texts=TEXTS * 8)
    b = batches[0]
    before = _logits(model, b)
    seen = []
    hook = mem.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    for bb in batches:
        with torch.no_grad():
            model(**bb)
    hook.remove()
    info = fit_input_whitening(model, batches)
    x = torch.cat([s[bb["attention_mask"].bool()] for s, bb in zip(seen, batches)]).double()
    torch.testing.assert_close(mem.in_mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    z = mem.in_whiten.double()
    torch.testing.assert_close(z, z.T)  # symmetric
    # Z C Z = I on the directions the corpus spans; floored eigenvalues (few tokens here) are the rest
    evals, evecs = torch.linalg.eigh(cov)
    kept = evals >= evals.max() * 1e-5
    spanned = evecs[:, kept]
    torch.testing.assert_close(spanned.T @ z @ cov @ z @ spanned, torch.eye(int(kept.sum()), dtype=torch.float64), rtol=1e-3, atol=1e-3)
    assert info[1]["eigenvalues_floored"] == int((~kept).sum())
    xq = torch.randn(1, 2, 64)
    manual = mem.query((xq - mem.in_mean) @ mem.in_whiten).view(1, 2, 2, 2, 8)
    torch.testing.assert_close(mem.query_halves(xq), torch.nn.functional.layer_norm(manual, (8,)))
    assert torch.equal(_logits(model, b), before)  # values still zero: still the base model
    # cached with the model's other statistics, and saved with the model
    calls = []
    fresh = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="zca", **SMALL))
    load_or_fit_input_whitening(fresh, lambda: calls.append(1) or batches, tmp_path, {"corpus": "t"})
    again = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="zca", **SMALL))
    load_or_fit_input_whitening(again, lambda: calls.append(2) or batches, tmp_path, {"corpus": "t"})
    assert calls == [1] and torch.equal(memory_layers(again)[1].in_whiten, memory_layers(fresh)[1].in_whiten)
    with torch.no_grad():
        memory_layers(again)[1].values.weight.normal_()
    save_retrofitted(again, tmp_path / "m")
    assert torch.equal(_logits(load_retrofitted(tmp_path / "m"), b), _logits(again, b))


def _grouped_batches(tok, questions, templates):
    """One batch per question: the question under every template, loss on its answer tokens,
    ``groups`` = the question's index (the layout of FactStreamDataModule.template_group_batches)."""
    from smf_lightning.data.facts import TrainingExample, collate_examples

    out = []
    for q, (question, answer) in enumerate(questions):
        examples = []
        for t in templates:
            prompt = tok(t.format(question=question), add_special_tokens=False)["input_ids"]
            ans = tok(" " + answer, add_special_tokens=False)["input_ids"]
            examples.append(TrainingExample(tuple(prompt + ans), (False,) * len(prompt) + (True,) * len(ans), f"q{q}", t))
        batch = collate_examples(examples, tok.pad_token_id)
        batch["groups"] = torch.full((len(templates),), q)
        out.append(batch)
    return out


def test_zca_within_whitens_with_the_within_question_covariance(tiny_tok, tmp_path):
    """input_norm=zca_within: Z = (W + alpha C)^-1/2 with W the pooled covariance of each
    question's answer positions around their mean over its templates (positions aligned by
    index), C and the mean from the same aligned positions; cached like ZCA, keyed by alpha."""
    cfg = MemoryConfig(layers=[1], input_norm="zca_within", whiten_on="loss", within_alpha=0.5, **SMALL)
    model = retrofit(tiny_qwen2(), cfg)
    mem = memory_layers(model)[1]
    templates = ["Question: {question}\nAnswer:", "Q: {question} A:", "Trivia: {question} Correct answer:"]
    questions = [("Who wrote Hamlet?", "William Shakespeare"), ("Capital of France?", "Paris"),
                 ("Largest planet?", "the planet Jupiter"), ("2+2?", "four"), ("Boiling point of water?", "100 degrees")] * 4
    batches = _grouped_batches(tiny_tok, questions, templates)
    seen = []
    hook = mem.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().double()))
    for bb in batches:
        with torch.no_grad():
            model(input_ids=bb["input_ids"], attention_mask=bb["attention_mask"])
    hook.remove()
    fit_input_whitening(model, batches, loss_tokens_only=True)
    aligned, dev = [], []
    for x, bb in zip(seen, batches):
        mask = loss_position_mask(bb["labels"])
        rows = [x[r][mask[r]] for r in range(x.shape[0])]
        n = min(r.shape[0] for r in rows)
        stack = torch.stack([r[:n] for r in rows])
        aligned.append(stack.reshape(-1, 64))
        dev.append((stack - stack.mean(0)).reshape(-1, 64))
    x, d = torch.cat(aligned), torch.cat(dev)
    n_dof = sum(a.shape[0] // len(templates) * (len(templates) - 1) for a in aligned)
    within = d.T @ d / n_dof
    total = (x - x.mean(0)).T @ (x - x.mean(0)) / x.shape[0]
    evals, evecs = torch.linalg.eigh(within + 0.5 * total)
    ref = (evecs * evals.clamp_min(evals.max() * 1e-5).rsqrt()) @ evecs.T
    torch.testing.assert_close(mem.in_mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mem.in_whiten.double(), ref, rtol=1e-4, atol=1e-4)
    zca = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="zca", whiten_on="loss", **SMALL))
    fit_input_whitening(zca, [{k: v for k, v in b.items() if k != "groups"} for b in batches], loss_tokens_only=True)
    assert not torch.allclose(memory_layers(zca)[1].in_whiten, mem.in_whiten, atol=1e-3)  # not ZCA
    # the cache key holds alpha: another alpha is fitted afresh, the same one loaded
    calls = []
    for alpha, expect in ((0.5, [1]), (0.5, [1]), (0.1, [1, 3])):
        m = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="zca_within", whiten_on="loss",
                                                within_alpha=alpha, **SMALL))
        load_or_fit_input_whitening(m, lambda a=alpha: calls.append(1 if a == 0.5 else 3) or batches, tmp_path,
                                    {"corpus": "g"}, loss_tokens_only=True)
        assert calls == expect
    with pytest.raises(ValueError, match="groups"):  # ordinary background batches cannot give W
        fit_input_whitening(retrofit(tiny_qwen2(), cfg), [{k: v for k, v in b.items() if k != "groups"} for b in batches],
                            loss_tokens_only=True)
    with pytest.raises(ValueError, match="whiten_on=loss"):
        MemoryConfig(layers=[1], input_norm="zca_within", whiten_on="all", **SMALL).validate()


def test_zca_within_runs_end_to_end_from_the_config(tmp_path):
    run = _tiny_cli(tmp_path, "model.memory.input_norm=zca_within", "model.memory.whiten_on=loss",
                    "model.memory.within_questions=4", "data.background.synthetic=8", "callbacks.checkpoint.enabled=false")
    s = json.loads((run / "summary.json").read_text())
    assert s["fact_recall"] is not None


def test_loss_position_whitening_uses_the_unmasked_forward(tiny_tok):
    """whiten_on=loss: statistics of the memory input at the loss positions of the ordinary
    forward (every real token attended), not of a forward that attends only to those positions."""
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], input_norm="whiten", **SMALL))
    batches = _batches(tiny_tok)
    for bb in batches:  # loss on the last two real tokens of every row
        labels = torch.full_like(bb["input_ids"], -100)
        for r, n in enumerate(bb["attention_mask"].sum(1).tolist()):
            start = bb["attention_mask"].shape[1] - n if tiny_tok.padding_side == "left" else 0
            labels[r, start + n - 2:start + n] = bb["input_ids"][r, start + n - 2:start + n]
        bb["labels"] = labels
    seen = []
    mem = memory_layers(model)[1]
    hook = mem.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    for bb in batches:
        with torch.no_grad():
            model(input_ids=bb["input_ids"], attention_mask=bb["attention_mask"])
    hook.remove()
    fit_input_whitening(model, batches, loss_tokens_only=True)
    x = torch.cat([s[loss_position_mask(bb["labels"])] for s, bb in zip(seen, batches)]).double()
    torch.testing.assert_close(mem.in_mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mem.in_std.double(), x.std(0, unbiased=False), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- selection levers


def _bg(counts):
    bg = BackgroundStats.empty(len(counts))
    bg.add_batch(torch.tensor(counts))
    return bg


def test_hub_slots_are_the_most_read_share_with_ties_to_lower_ids():
    bg = _bg([5, 9, 9, 0, 1, 7, 2, 3, 4, 8])
    assert torch.nonzero(hub_slots(bg, 0.2)).squeeze(1).tolist() == [1, 2]
    assert torch.nonzero(hub_slots(bg, 0.25)).squeeze(1).tolist() == [1, 2, 9]  # ceil(2.5) = 3
    assert not hub_slots(bg, 0.0).any()
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        hub_slots(bg, 1.0)


@pytest.mark.parametrize("selector", ["kl", "tfidf", "tf", "random", "all"])
def test_excluded_slots_are_never_selected(selector):
    counts = torch.tensor([0, 5, 3, 8, 1, 9, 2, 7])
    bg = _bg([1] * 8)
    exclude = torch.tensor([False, True, False, True, False, False, False, True])
    sel = select_slots(counts, selector, 3, bg=bg, generator=torch.Generator().manual_seed(0), exclude=exclude)
    assert not set(sel.tolist()) & {1, 3, 7} and set(sel.tolist()) <= {2, 4, 5, 6}
    if selector in ("kl", "tfidf", "tf"):  # the three best-scored allowed slots; scores are not renormalised
        scores = score_slots(counts, selector, bg)
        allowed = [i for i in (2, 4, 5, 6)]
        assert sel.tolist() == sorted(sorted(allowed, key=lambda i: -float(scores[i]))[:3])
    if selector == "tf":
        assert sel.tolist() == [2, 5, 6]


def _smf(model, bg, **cfg):
    from smf_lightning.methods import SparseMemoryFinetune

    base = {"selector": "kl", "top_t": 4, "optimizer": "adam", "lr": 0.1}
    return SparseMemoryFinetune(model, {**base, **cfg}, background=bg)


@pytest.mark.parametrize("loss_tokens_only", [True, False])
def test_per_fact_selection_budget_and_step_union(tiny_tok, loss_tokens_only):
    from smf_lightning.data.facts import collate_examples, encode_example, make_templates

    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], **SMALL))
    bg = {1: _bg([3] * 64)}
    module = _smf(model, bg, select_per="fact", top_t=3, loss_tokens_only=loss_tokens_only)
    tmpl = make_templates({"qa": "Question: {question}\nAnswer: {answer}\n", "q_a": "Q: {question} A: {answer}\n"})
    examples = [encode_example(tiny_tok, tmpl[t], q, a, "answer", fid)
                for fid, q, a in (("f1", "Who wrote Hamlet?", "Shakespeare"), ("f2", "What is 2+2?", "four"))
                for t in ("qa", "q_a")]
    collate = lambda ex: collate_examples(ex, pad_id=1)  # noqa: E731
    slots = module.select_fact_slots(examples, collate)
    assert set(slots) == {"f1", "f2"} and all(s[1].numel() <= 3 for s in slots.values())
    # a fact's slots are the top-3 of its own two sequences, exactly
    batch = collate([e for e in examples if e.fact_id == "f1"])
    module.on_accumulation_start()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    module.after_backward(batch)
    assert torch.equal(slots["f1"][1], select_slots(module._counts[1], "kl", 3, bg=bg[1]))
    # a step on a mixed batch updates the union of its facts' slots that the batch read
    module.fact_slots = slots
    mixed = collate([examples[0], examples[3]])
    module.on_accumulation_start()
    with torch.no_grad():
        model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"])
    module.after_backward(mixed)
    step = module._step_selection(1, memory_layers(model)[1])
    union = set(slots["f1"][1].tolist()) | set(slots["f2"][1].tolist())
    assert set(step.tolist()) <= union and all(module._counts[1][s] > 0 for s in step.tolist())


def _tiny_cli(tmp_path, *extra):
    from test_train import TINY, cli

    res = cli([*TINY, f"hydra.run.dir={tmp_path}", *extra])
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp_path


def test_ownership_keeps_later_tasks_off_earlier_slots_and_hubs_are_never_selected(tmp_path):
    run = _tiny_cli(tmp_path, "method.exclude_owned=true", "method.exclude_hubs=0.1", "method.optimizer_state=fresh",
                    "callbacks.checkpoint.enabled=false")
    rows = list(csv.DictReader((run / "slot_stats.csv").open()))
    later = [r for r in rows if r["task"] == "1"]
    assert later and all(float(r["jaccard_earlier"]) == 0.0 for r in later)
    s = json.loads((run / "summary.json").read_text())
    assert s["method_config"]["exclude_owned"] is True and s["method_config"]["exclude_hubs"] == 0.1


def test_fresh_optimizer_state_per_task(tiny_tok):
    import lightning as L

    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], **SMALL))
    module = _smf(model, {1: _bg([1] * 64)}, optimizer_state="fresh")
    enc = tiny_tok(TEXTS[:2], return_tensors="pt", padding=True)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
             "labels": enc.input_ids.masked_fill(enc.attention_mask == 0, -100)}
    sizes = []

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            sizes.append(len(trainer.optimizers[0].state))

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    # callbacks' epoch-start hook runs before the module's: task 1 saw task 0's state, then it was cleared
    assert sizes == [0, 1] and len(trainer.optimizers[0].state) == 1
    assert len(trainer.optimizers[0].state[memory_layers(model)[1].values.weight]) > 0


# ----------------------------------------------------------------------------- schedule


def test_interleaved_schedule_mixes_facts_and_repeats_each_example_once_per_pass(tiny_tok):
    from test_data import _data_cfg

    from smf_lightning.streams.datamodule import FactStreamDataModule

    cfg = _data_cfg(n_tasks=2, facts_per_task=4, suites={}, background={"synthetic": 4}, train_batch_size=4,
                    repeats_per_batch=1, schedule="interleaved", epochs_per_task=3)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **cfg)
    dm.setup()
    batches = dm.train_batches(0)
    n = len(dm.training_examples(0))  # 4 facts x 4 training templates
    assert len(batches) == 3 * n // 4
    for p in range(3):
        one_pass = [e for b in batches[p * 4:(p + 1) * 4] for e in b]
        assert sorted((e.fact_id, e.template) for e in one_pass) == sorted((e.fact_id, e.template) for e in dm.training_examples(0))
    assert any(len({e.fact_id for e in b}) > 1 for b in batches)  # batches mix facts
    key = lambda b: tuple((e.fact_id, e.template) for e in b)  # noqa: E731
    passes = [[key(b) for b in batches[p * 4:(p + 1) * 4]] for p in range(3)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # the same batches every pass (prefix cache hits)...
    assert any(p != passes[0] for p in passes[1:])  # ...in a new order
    again = FactStreamDataModule(tokenizer=tiny_tok, **cfg)
    again.setup()
    assert [[(e.fact_id, e.template) for e in b] for b in again.train_batches(0)] == [[(e.fact_id, e.template) for e in b] for b in batches]


def test_order_seed_reorders_batches_and_keeps_the_stream(tiny_tok):
    from test_data import _data_cfg

    from smf_lightning.streams.datamodule import FactStreamDataModule

    cfg = _data_cfg(n_tasks=2, facts_per_task=4, suites={}, background={"synthetic": 4}, train_batch_size=4,
                    repeats_per_batch=1, schedule="interleaved", epochs_per_task=2)
    key = lambda dm: [[(e.fact_id, e.template) for e in b] for b in dm.train_batches(0)]  # noqa: E731
    dms = [FactStreamDataModule(tokenizer=tiny_tok, **{**cfg, "order_seed": s}) for s in (None, 0, 1)]
    for dm in dms:
        dm.setup()
    assert dms[0].tasks == dms[1].tasks == dms[2].tasks  # the same facts in the same tasks
    assert key(dms[0]) == key(dms[1])  # null = data.seed (0)
    assert key(dms[2]) != key(dms[0])
    assert sorted(e for b in key(dms[2]) for e in b) == sorted(e for b in key(dms[0]) for e in b)  # same sequences


# ----------------------------------------------------------------------------- known facts


def test_known_facts_suite_is_disjoint_known_everywhere_and_scores_one_before(tmp_path, tiny_tok, monkeypatch):
    from test_data import _trivia_cfg, _write_fake_root

    from smf_lightning.eval import scoring
    from smf_lightning.eval import suites as suites_mod
    from smf_lightning.streams.datamodule import FactStreamDataModule

    # The "model" answers the even-numbered questions; the multiples of 4 with a longer phrase
    # (contains the alias, not an exact answer): only the former may enter the known-facts suite.
    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        out = []
        for p in prompts:
            i = int(p.rsplit("Trivia question number ", 1)[1].split("?")[0])
            out.append(" no idea" if i % 2 else f" it is Answer{i}" if i % 4 == 0 else f" Answer{i}")
        return out

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    monkeypatch.setattr(suites_mod, "generate_greedy", fake_generate)
    root = _write_fake_root(tmp_path / "olmo")
    suites = {"triviaqa_known": {"n_items": 3}}
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                              **_trivia_cfg(root, tmp_path, probe_pool_size=12, suites=suites, n_tasks=2, facts_per_task=1))
    dm.setup()
    known = dm.heldout_suites()["triviaqa_known"]
    ids = [int(f.id[2:]) for f in known.facts]
    assert len(ids) == 3 and all(i % 2 == 0 and i % 4 != 0 for i in ids)
    stream = {f.id for t in dm.tasks for f in t}
    background = {f.id for f in dm._background_facts}
    assert not {f.id for f in known.facts} & (stream | background)
    assert known.evaluate(None, tiny_tok, 4) == {"em": 1.0, "contains": 1.0}
    assert known.template.prompt("Q?") == dm.probe_prompt.replace("{question}", "Q?")
    too_many = {"triviaqa_known": {"n_items": 30}}
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                              **_trivia_cfg(root, tmp_path, probe_pool_size=12, suites=too_many, n_tasks=2, facts_per_task=1))
    with pytest.raises(ValueError, match="triviaqa_known: only .* answered exactly .* lower data.suites.triviaqa_known.n_items"):
        dm.setup()


# ----------------------------------------------------------------------------- the shared "before" evaluation


def test_before_evaluation_is_cached_across_runs_that_start_from_the_base(tmp_path):
    from test_train import TINY, cli

    env = {"SMF_CACHE": str(tmp_path / "cache")}

    def run(name, *extra):
        res = cli([*TINY, f"hydra.run.dir={tmp_path / name}", "callbacks.checkpoint.enabled=false", *extra], extra_env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text()), res.stdout + res.stderr

    def before_rows(name):
        return [r for r in csv.DictReader((tmp_path / name / "heldout.csv").open()) if r["eval_point"] == "0"]

    first, _ = run("first")
    assert first["before_eval_from_cache"] is False
    # another SMF run from the same base, stream and suites (other selector, other memory keys): cache hit
    second, out = run("second", "method.selector=tfidf", "model.memory.seed=3")
    assert second["before_eval_from_cache"] is True and "loaded from" in out
    assert before_rows("second") == before_rows("first")
    assert second["accuracy_matrix"][0] == first["accuracy_matrix"][0]
    assert {k: v["before"] for k, v in second["heldout"].items()} == {k: v["before"] for k, v in first["heldout"].items()}
    # a replace-mode memory is not the base function: evaluated afresh
    third, _ = run("third", "model.memory.mode=replace")
    assert third["before_eval_from_cache"] is False
    # a different suite size is a different key
    fourth, _ = run("fourth", "data.suites.lambada.n_items=3")
    assert fourth["before_eval_from_cache"] is False


def test_before_evaluation_key_holds_the_facts_content_not_only_their_ids():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from smf_lightning.data.facts import Fact
    from smf_lightning.eval.before_cache import before_eval_key

    cfg = OmegaConf.create({"model": {"name": "m", "source": "s", "dtype": "float32"}, "data": {"suites": {}}})

    def dm(answer, rephrased=()):
        fact = Fact(id="f1", question="Who?", answer=answer, aliases=(answer,), rephrased=rephrased)
        return SimpleNamespace(n_tasks=1, task_facts=lambda t: (fact,), templates={"qa": SimpleNamespace(text="Q {question} A {answer}")},
                               train_templates=["qa"], heldout_templates=[], _known=[fact],
                               probe_prompt="{question}", seed=0, source="offline", recall_max_new_tokens=4,
                               rephrased_max_new_tokens=8, eval_batch_size=2, generation_batch_size=2)

    assert before_eval_key(cfg, dm("Paris"), "fp") == before_eval_key(cfg, dm("Paris"), "fp")
    assert before_eval_key(cfg, dm("Paris"), "fp")["stream"] != before_eval_key(cfg, dm("Rome"), "fp")["stream"]
    # the rephrasings are asked at the "before" point too: other rephrasings, another point
    assert "rephrased" not in before_eval_key(cfg, dm("Paris"), "fp")
    assert before_eval_key(cfg, dm("Paris", ("Whom?",)), "fp") != before_eval_key(cfg, dm("Paris", ("Which one?",)), "fp")


def test_score_scale_sharpens_weights_and_keeps_the_slots():
    x = torch.randn(3, 5, 64)
    flat = ProductKeyMemory(64, MemoryConfig(layers=[1], **SMALL))
    sharp = ProductKeyMemory(64, MemoryConfig(layers=[1], score_scale=10.0, **SMALL))
    with torch.no_grad():
        i1, w1 = flat.lookup(x)
        i2, w2 = sharp.lookup(x)
    assert torch.equal(i1, i2)  # the same slots, ...
    assert (w2.max(-1).values >= w1.max(-1).values - 1e-7).all()  # ... each read concentrated on its best
    torch.testing.assert_close(w2.sum(-1), torch.ones(w2.shape[:-1]))
    with pytest.raises(ValueError, match="score_scale"):
        MemoryConfig(layers=[1], score_scale=0.0, **SMALL).validate()


def test_count_by_weight_counts_read_mass_and_steers_the_budget():
    from smf_lightning.selection.selectors import slot_counts

    ids = torch.tensor([3, 1, 3, 2])
    w = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert slot_counts(ids, 5).tolist() == [0, 1, 1, 2, 0]
    assert slot_counts(ids, 5, weights=w).tolist() == [0.0, 0.25, 0.125, 0.625, 0.0]
    # read counts tie slots 1 and 2 (one read each; the lower id wins); read mass prefers slot 1
    assert select_slots(slot_counts(ids, 5), "tf", 2).tolist() == [1, 3]
    assert select_slots(slot_counts(ids, 5, weights=w), "tf", 1).tolist() == [3]
    mass = slot_counts(torch.tensor([2, 1, 2]), 5, weights=torch.tensor([0.1, 0.3, 0.1]))
    assert select_slots(mass, "tf", 1).tolist() == [1]  # 0.3 beats 2 x 0.1
    assert select_slots(slot_counts(torch.tensor([2, 1, 2]), 5), "tf", 1).tolist() == [2]  # 2 reads beat 1
