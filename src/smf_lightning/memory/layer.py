"""Product-key memory layer ("Memory+"), read top to bottom.

Lample et al. 2019 ("Large Memory Layers with Product Keys") and Berges et al. 2024
("Memory Layers at Scale") define the layer; Lin et al. 2025 ("Continual Learning via
Sparse Memory Finetuning") and the seed paper ("Improving Sparse Memory Finetuning")
finetune only its value rows. docs/design.md §2 is the spec this file implements:

    q = norm(W_q x)                           per head, k_dim
    q1, q2 = halves of q                      k_dim / 2 each
    top-knn of q1·K1 and of q2·K2             K1, K2: sqrt(N) sub-keys per head
    best knn of the knn² sums s1_i + s2_j     slot id = i·sqrt(N) + j
    w = softmax(scores) in fp32               per head
    y = Σ_heads Σ_knn w · V[slot]             EmbeddingBag gather-and-sum, V: N × v_dim
    out = W_o (y ⊙ silu(W_g x))               gated ("swilu") output

All heads share one value table, so slot ids live in [0, N) whichever head picked them.
Every forward leaves the picked slots in ``self.last_access`` for slot statistics and
slot selection (selection/), with the padding mask attached by the retrofit hook.

Precision (``trainer.precision=bf16-mixed``, or a ``bfloat16`` model): the addressing (query,
sub-key scores, top-knn, softmax) and the weighted gather of value rows run in float32 with
autocast off; only the gate and output projections follow the run's precision. bf16 keeps 8
bits of mantissa, so neighbouring sub-key scores would tie or swap and which slots a token
reads — what slot statistics, background counts and selection are keyed on — would depend on
the precision; the cost is small (sqrt(N) sub-keys per head, heads·knn rows per token). The
value table itself is kept in float32 by the retrofit (memory/retrofit.py).

Read gate (``read_gate=tau``, experiments/recipe/RECIPE.md "The read gate"; the deferral radius of GRACE, Hartvigsen et al. 2023):
product keys pick a token's slots from two half-query projections only, so the queries of
*different* questions that land on one slot are nearly orthogonal in the full query space
(cosine median 0.08 at the answer positions of known TriviaQA facts vs 0.99 for the positions
that trained the slot, 100 facts; experiments/tools/diag_gate.py). With the gate on, every row keeps
a *write key*, the read-weighted sum of the normalised queries of the loss positions whose
updates wrote it (``write_delta`` / ``add_writes``, called by SMF at each step for the rows it
updates), and a read of a row that has a write key counts only if the reading query's cosine
with it is >= tau. Rows never written have no key and are read as before (in additive mode
they are zero), so the base function is unchanged. The keys are a float32 buffer of
N x heads x k_dim (268 MB at 512^2 slots and one head of 256).

Serving gate (``serve_gate=tau'``): the threshold in eval mode (every evaluation, ``ask``, a loaded
export) when it should differ from training's. Training passes reads at ``read_gate``, so the
rewordings of a fact reach its rows and write their keys; answering at a stricter ``tau'`` keeps
questions that are merely similar off the written rows. Forwards of the training loop that run in
eval mode (SMF's per-fact slot selection) use ``read_gate`` (:func:`training_gate`), so training is
the same whatever ``serve_gate`` is.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn


INPUT_NORMS = ("none", "whiten", "center", "zca", "zca_within")


@dataclass
class MemoryConfig:
    """Shape and placement of the memory layers. Defaults live in conf/memory/*.yaml (model.memory)."""

    # decoder layers that get a memory: indices, or fractions of the depth in (0, 1) (resolve_layers)
    layers: list[int | float] = field(default_factory=lambda: [12])
    n_slots: int = 16384  # N, a perfect square: sqrt(N) sub-keys per half
    heads: int = 4  # query heads; all share the value table
    knn: int = 16  # slots read per head and token (also the sub-key top-k)
    k_dim: int = 256  # query / full key dim per head (halves are k_dim / 2)
    v_dim: int | None = None  # value dim; None = the model's hidden size (seed paper)
    mode: str = "additive"  # "additive": mlp(x) + mem(x), values start at 0; "replace": mem(x) only
    query_norm: bool = True  # layer-norm the query halves (stabilises sub-key scores)
    seed: int = 0  # seeds keys and projections, so the same config gives the same memory
    sparse_grad: bool = True  # EmbeddingBag(sparse=True): value grads touch only accessed rows
    key_init: str = "random"  # random | kmeans (data-driven sub-keys, memory/key_init.py)
    # "swilu": out = W_o (y ⊙ silu(W_g x)) (Berges et al. 2024, the seed paper); "direct": out = y,
    # the value rows live in the residual space (DOTS): no random projections between a trained
    # value and the logits, so a row's update moves the residual by exactly that row.
    output: str = "swilu"
    # "none": q = W_q x; "whiten": q = W_q ((x - mean) / std) with the background corpus's mean and
    # std per dimension (memory/whitening.py; DOTS); "center": q = W_q (x - mean); "zca": q = W_q Z (x - mean)
    # with Z = C^-1/2 from the background covariance C (full whitening: every direction, not only every
    # axis, gets unit variance). Outlier dimensions and shared directions (the template at an answer
    # position) otherwise dominate every query, so different entities read the same slots.
    input_norm: str = "none"
    # input_norm="zca_within": Z = (W + within_alpha C)^-1/2, W the covariance of background questions'
    # deviations from their own mean over the training templates (memory/whitening.py): directions
    # in which one question's templates differ are damped, so its templates read shared slots.
    within_alpha: float = 0.003
    within_questions: int = 400  # background questions rendered under every training template to fit W
    # What varies within a group of W: "templates" (one question under every training template) or
    # "rewordings" (one question and its model-written rewordings under the first template, data/rewording.py):
    # directions in which wordings of one question differ are damped, so a rewording reads the rows its
    # question wrote (docs/design.md "Rephrased questions").
    within_groups: str = "templates"
    # Which background positions the whitening statistics come from: "all" real tokens, or "loss"
    # (answer-predicting) positions only, the positions whose reads SMF trains (memory/whitening.py).
    whiten_on: str = "all"
    # Softmax inverse temperature over a head's knn scores. With random sub-keys the top-knn scores
    # lie close together, so at 1.0 the weights are nearly uniform (1/knn each) and a trained row
    # moves the output by ~1/knn of its change; larger values concentrate each read on its best slots.
    score_scale: float = 1.0
    # Read gate (module doc): a read of a written row counts only if the query's cosine with the
    # row's write key is >= read_gate. null = off. 0.3 separates the measured cosines of a row's
    # own training positions (median 0.99) and of its facts under the held-out template (median
    # 0.89) from those of other questions (median 0.08, 90% quantile 0.17; diag_gate.py, 100 facts).
    read_gate: float | None = None
    # The read gate's threshold when the model answers (eval mode: evaluation, ask, an export) rather
    # than trains; null = read_gate. A looser gate in training lets every wording of a fact reach
    # and write its rows; a stricter one when answering keeps other questions off them (module doc,
    # "Serving gate"; experiments/rephrase/REPHRASE.md, the gate frontier).
    serve_gate: float | None = None

    def validate(self, n_layers: int | None = None) -> None:
        root = math.isqrt(self.n_slots)
        if self.n_slots < 1 or root * root != self.n_slots:
            raise ValueError(
                f"memory.n_slots={self.n_slots} is not a perfect square; product keys need "
                f"N = s*s (e.g. 16384 = 128^2, 1048576 = 1024^2)."
            )
        if not 1 <= self.knn <= root:
            raise ValueError(
                f"memory.knn={self.knn} must be between 1 and sqrt(n_slots)={root}: each half "
                f"picks its top-knn of {root} sub-keys."
            )
        if self.k_dim < 2 or self.k_dim % 2:
            raise ValueError(f"memory.k_dim={self.k_dim} must be an even number >= 2 (it is split in halves).")
        if self.heads < 1:
            raise ValueError(f"memory.heads={self.heads} must be >= 1.")
        if self.key_init not in ("random", "kmeans"):
            raise ValueError(f"memory.key_init={self.key_init!r}; allowed: 'random', 'kmeans'.")
        if self.output not in ("swilu", "direct"):
            raise ValueError(f"memory.output={self.output!r}; allowed: 'swilu', 'direct'.")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"memory.input_norm={self.input_norm!r}; allowed: {', '.join(map(repr, INPUT_NORMS))}.")
        if self.input_norm == "zca_within":
            if self.whiten_on != "loss":
                raise ValueError("memory.input_norm=zca_within fits its statistics at the answer positions: "
                                 "set memory.whiten_on=loss.")
            if not self.within_alpha > 0:
                raise ValueError(f"memory.within_alpha={self.within_alpha!r} must be > 0 (W + alpha C must be invertible).")
            if self.within_questions < 2:
                raise ValueError(f"memory.within_questions={self.within_questions!r} must be >= 2.")
        if self.within_groups not in ("templates", "rewordings"):
            raise ValueError(f"memory.within_groups={self.within_groups!r}; allowed: 'templates', 'rewordings'.")
        if not self.score_scale > 0:
            raise ValueError(f"memory.score_scale={self.score_scale!r} must be > 0 (softmax inverse temperature).")
        if self.whiten_on not in ("all", "loss"):
            raise ValueError(f"memory.whiten_on={self.whiten_on!r}; allowed: 'all', 'loss'.")
        if self.read_gate is not None:
            if not -1.0 <= float(self.read_gate) <= 1.0:
                raise ValueError(f"memory.read_gate={self.read_gate!r} is a cosine threshold: give a number in "
                                 "[-1, 1], or null to turn the gate off.")
            if self.mode != "additive":
                raise ValueError("memory.read_gate needs memory.mode=additive: rows without a write key are read "
                                 "ungated, which is only the base function when unwritten rows are zero.")
        if self.serve_gate is not None:
            if self.read_gate is None:
                raise ValueError(f"memory.serve_gate={self.serve_gate!r} needs a read gate: without "
                                 "memory.read_gate no write keys are kept, so there is nothing to compare with.")
            if not -1.0 <= float(self.serve_gate) <= 1.0:
                raise ValueError(f"memory.serve_gate={self.serve_gate!r} is a cosine threshold: give a number in "
                                 "[-1, 1], or null to answer with memory.read_gate.")
        if self.mode not in ("additive", "replace"):
            raise ValueError(f"memory.mode={self.mode!r}; allowed: 'additive', 'replace'.")
        if not self.layers:
            raise ValueError("memory.layers is empty; give at least one decoder layer index, e.g. [12].")
        negative = [i for i in self.layers if _is_index(i) and i < 0]
        if negative:
            raise ValueError(f"memory.layers={list(self.layers)}: index {negative} out of range; a decoder layer index "
                             "is >= 0 (or give a fraction of the depth in (0, 1)).")
        bad = [f for f in self.layers if not _is_index(f) and not (isinstance(f, float) and 0.0 < f < 1.0)]
        if bad:
            raise ValueError(f"memory.layers={list(self.layers)}: {bad[0]!r} is neither a decoder layer index (an "
                             "integer >= 0) nor a fraction of the model's depth (a number strictly between 0 and 1).")
        if n_layers is not None:
            resolved = resolve_layers(self.layers, n_layers)
            if len(set(resolved)) != len(resolved):
                raise ValueError(f"memory.layers={list(self.layers)} names a layer twice on a model of {n_layers} "
                                 f"decoder layers ({resolved}).")
            bad = [i for i in resolved if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"memory.layers={list(self.layers)}: index {bad} out of range; this model has "
                    f"{n_layers} decoder layers (valid: 0..{n_layers - 1})."
                )
        elif len(set(self.layers)) != len(self.layers):
            raise ValueError(f"memory.layers={list(self.layers)} has duplicates.")

    def resolved(self, n_layers: int) -> MemoryConfig:
        """This config with ``layers`` as decoder layer indices of a model of ``n_layers`` layers."""
        return replace(self, layers=resolve_layers(self.layers, n_layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(d["layers"])
        return d


def _is_index(layer) -> bool:
    return isinstance(layer, int) and not isinstance(layer, bool)


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Decoder layer indices of ``memory.layers``: an integer is an index; a number strictly between 0 and
    1 is a fraction of the model's depth, the layer ``floor(f * n_layers)`` (0.625 of Qwen2.5-0.5B's 24
    layers: 15; of SmolLM2-135M's 30: 18), so one setting places the memory on any model."""
    return [layer if _is_index(layer) else math.floor(layer * n_layers + 1e-9) for layer in layers]


@dataclass
class SlotAccess:
    """The slots one memory forward read: ids and softmax weights per token, head and knn."""

    indices: torch.Tensor  # [B, T, heads, knn] int64 slot ids in [0, N)
    weights: torch.Tensor  # [B, T, heads, knn] float32 softmax weights
    token_mask: torch.Tensor | None = None  # [B, T] bool, True = real token (None = all real)
    queries: torch.Tensor | None = None  # [B, T, heads, k_dim] normalised queries (read gate only)

    def mask(self, extra: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] bool: tokens that count (not padding, and ``extra`` where given)."""
        B, T = self.indices.shape[:2]
        m = torch.ones(B, T, dtype=torch.bool, device=self.indices.device)
        if self.token_mask is not None:
            m &= _last_columns(self.token_mask, T).bool()
        if extra is not None:
            m &= _last_columns(extra, T).bool()
        return m

    def slot_ids(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Flat slot ids (with multiplicity) over counted tokens; padding is excluded."""
        return self.indices[self.mask(mask)].reshape(-1)


def _autocast_off(x: torch.Tensor):
    """Autocast disabled on x's device type (a no-op when no autocast is active)."""
    if x.device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _last_columns(mask: torch.Tensor, T: int) -> torch.Tensor:
    # During cached generation the attention mask covers the whole prefix while the
    # memory only sees the newest T positions: align on the right.
    return mask[:, -T:] if mask.shape[-1] != T else mask


class ProductKeyMemory(nn.Module):
    def __init__(self, hidden_size: int, cfg: MemoryConfig, layer_idx: int = -1):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_slots = cfg.n_slots
        self.n_sub = math.isqrt(cfg.n_slots)
        self.heads, self.knn, self.k_dim = cfg.heads, cfg.knn, cfg.k_dim
        self.v_dim = cfg.v_dim or hidden_size
        if cfg.output == "direct" and self.v_dim != hidden_size:
            raise ValueError(
                f"memory.output='direct' adds value rows to the residual stream, so memory.v_dim must be "
                f"null or the model's hidden size ({hidden_size}); got {self.v_dim}."
            )
        half = cfg.k_dim // 2

        self.query = nn.Linear(hidden_size, cfg.heads * cfg.k_dim, bias=False)
        # sub-keys: [heads, 2 halves, sqrt(N), k_dim/2]
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, self.n_sub, half))
        self.values = nn.EmbeddingBag(cfg.n_slots, self.v_dim, mode="sum", sparse=cfg.sparse_grad)
        if cfg.output == "swilu":
            self.gate = nn.Linear(hidden_size, self.v_dim, bias=False)
            self.out = nn.Linear(self.v_dim, hidden_size, bias=False)
        else:
            self.gate = self.out = None
        # Input statistics for whitening / centring (memory/whitening.py fits them on the background
        # corpus); saved with the model. Identity until fitted.
        self.register_buffer("in_mean", torch.zeros(hidden_size))
        self.register_buffer("in_std", torch.ones(hidden_size))
        if cfg.input_norm in ("zca", "zca_within"):  # only then: checkpoints of the other modes keep their keys
            self.register_buffer("in_whiten", torch.eye(hidden_size))
        if cfg.read_gate is not None:  # write keys (module doc): summed queries per row and head, and their weight
            self.register_buffer("write_keys", torch.zeros(cfg.n_slots, cfg.heads, cfg.k_dim))
            self.register_buffer("write_mass", torch.zeros(cfg.n_slots, cfg.heads))
        self.last_access: SlotAccess | None = None
        self.token_mask: torch.Tensor | None = None  # set per model call by the retrofit hook
        self.record_weights = True  # statistics need only ids; keep weights for analysis by default
        self.train_gate_forced = False  # training_gate(): read_gate even in eval mode
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + max(self.layer_idx, 0))
        half = self.k_dim // 2
        bound = 1 / math.sqrt(half)  # uniform sub-keys as in Lample et al. 2019
        self.keys.copy_(torch.rand(self.keys.shape, generator=g) * 2 * bound - bound)
        for lin in (self.query, self.gate, self.out):
            if lin is None:
                continue
            b = 1 / math.sqrt(lin.in_features)  # nn.Linear's default scale, but seeded
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * b - b)
        if self.cfg.mode == "additive":
            # Zero values: the retrofitted model is the base model at step 0 (docs/design.md §2).
            self.values.weight.zero_()
        else:
            # sampled on the CPU generator, then copied: works whatever device the table is on
            self.values.weight.copy_(torch.empty(self.values.weight.shape).normal_(0.0, self.v_dim**-0.5, generator=g))

    def query_halves(self, x: torch.Tensor) -> torch.Tensor:
        """[..., heads, 2, k_dim/2]: the (normalised) query halves scored against the sub-keys,
        in float32 (module doc: precision)."""
        half = self.k_dim // 2
        with _autocast_off(x):
            x = x.float()
            if self.cfg.input_norm != "none":
                x = x - self.in_mean.float()
                if self.cfg.input_norm == "whiten":
                    x = x / self.in_std.float()
                elif self.cfg.input_norm in ("zca", "zca_within"):
                    x = x @ self.in_whiten.float()  # symmetric, so x Z = (Z x^T)^T
            q = F.linear(x, self.query.weight.float()).view(*x.shape[:-1], self.heads, 2, half)
            return F.layer_norm(q, (half,)) if self.cfg.query_norm else q

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids and fp32 softmax weights, each [B, T, heads, knn] (before any read gate)."""
        with _autocast_off(x):
            idx, w, _ = self._lookup(x)
            return idx, w

    def _lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.query_halves(x).view(B * T, self.heads, 2, self.k_dim // 2)
        keys = self.keys.float()
        s1 = torch.einsum("bhd,hnd->bhn", q[:, :, 0], keys[:, 0])  # [BT, H, sqrt N]
        s2 = torch.einsum("bhd,hnd->bhn", q[:, :, 1], keys[:, 1])
        s1, i1 = s1.topk(self.knn, dim=-1)
        s2, i2 = s2.topk(self.knn, dim=-1)
        # The best knn of the knn*knn sums are exactly the best knn over all N slots:
        # any slot outside both top-knn lists is beaten by knn candidates in the grid.
        pair = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [BT, H, knn*knn]
        scores, best = pair.topk(self.knn, dim=-1)
        idx = i1.gather(-1, best // self.knn) * self.n_sub + i2.gather(-1, best % self.knn)
        weights = torch.softmax(scores.float() * self.cfg.score_scale, dim=-1)
        return idx.view(B, T, self.heads, self.knn), weights.view(B, T, self.heads, self.knn), q

    def gate_threshold(self) -> float | None:
        """The read gate's threshold for this forward: serve_gate in eval mode (outside
        :func:`training_gate`) where set, read_gate otherwise; None = no gate."""
        c = self.cfg
        if c.read_gate is not None and c.serve_gate is not None and not self.training and not self.train_gate_forced:
            return float(c.serve_gate)
        return None if c.read_gate is None else float(c.read_gate)

    def _read_gate(self, idx: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
        """[B, T, heads, knn] 0/1: a read of a row with a write key passes if cos(query, key) >= tau;
        reads of rows without one pass. q: [B, T, heads, k_dim], normalised."""
        head = torch.arange(self.heads, device=idx.device).view(1, 1, self.heads, 1).expand_as(idx)
        keyed = self.write_mass[idx, head] > 0
        gate = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
        if bool(keyed.any()):
            keys = self.write_keys[idx[keyed], head[keyed]]  # [M, k_dim], only the reads of written rows
            reading = q.unsqueeze(3).expand(*idx.shape, q.shape[-1])[keyed]
            cos = (keys * reading).sum(-1) / keys.norm(dim=-1).clamp_min(1e-12)
            gate[keyed] = (cos >= tau).float()
        return gate

    @torch.no_grad()
    def write_delta(self, rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                    queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What reads add to the write keys of ``rows`` (sorted unique slot ids): idx, weights
        [P, heads, knn] and queries [P, heads, k_dim] (normalised) of P positions, e.g. a step's
        loss positions; reads of other rows are ignored. Returns ([len(rows), heads, k_dim] summed
        weighted queries, [len(rows), heads] summed weights), for ``add_writes``."""
        keys = torch.zeros(rows.numel(), self.heads, self.k_dim, device=self.write_keys.device)
        mass = torch.zeros(rows.numel(), self.heads, device=self.write_keys.device)
        if rows.numel() == 0 or idx.numel() == 0:
            return keys, mass
        head = torch.arange(self.heads, device=idx.device).view(1, self.heads, 1).expand_as(idx)
        pos = torch.searchsorted(rows, idx).clamp(max=rows.numel() - 1)
        hit = rows[pos] == idx
        w = weights.float()[hit]
        keys.index_put_((pos[hit], head[hit]), w.unsqueeze(-1) * queries.unsqueeze(2).expand(*idx.shape, -1)[hit].float(),
                        accumulate=True)
        mass.index_put_((pos[hit], head[hit]), w, accumulate=True)
        return keys, mass

    def written_rows(self) -> torch.Tensor:
        """Slot ids that have a write key (some head), sorted."""
        return torch.nonzero(self.write_mass.sum(1) > 0).squeeze(1)

    @torch.no_grad()
    def clear_writes(self) -> None:
        """Drop every write key: the gate is the identity again."""
        self.write_keys.zero_()
        self.write_mass.zero_()

    @torch.no_grad()
    def add_writes(self, rows: torch.Tensor, keys: torch.Tensor, mass: torch.Tensor) -> None:
        """Add ``write_delta``'s sums to the write keys of ``rows``."""
        self.write_keys[rows] += keys.to(self.write_keys.dtype)
        self.write_mass[rows] += mass.to(self.write_mass.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, n = x.shape
        with _autocast_off(x):
            idx, w, q = self._lookup(x)
            queries = None
            tau = self.gate_threshold()
            if tau is not None:
                queries = F.normalize(q.reshape(B, T, self.heads, self.k_dim), dim=-1)
                w = w * self._read_gate(idx, queries, tau)
        self.last_access = SlotAccess(
            indices=idx.detach(),
            weights=w.detach() if self.record_weights else w.new_empty(0),
            token_mask=self.token_mask,
            queries=None if queries is None else queries.detach(),
        )
        flat_idx = idx.view(B * T, self.heads * self.knn)
        flat_w = w.view(B * T, self.heads * self.knn).to(self.values.weight.dtype)
        with _autocast_off(x):  # the weighted sum of value rows in the table's dtype (float32)
            y = self.values(flat_idx, per_sample_weights=flat_w).view(B, T, self.v_dim).to(x.dtype)
        if self.out is None:  # output="direct"
            return y
        return self.out(y * F.silu(self.gate(x)))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer={self.layer_idx}, N={c.n_slots}, heads={c.heads}, knn={c.knn}, k_dim={c.k_dim}, v_dim={self.v_dim}, "
                f"output={c.output}, input_norm={c.input_norm}" + (f", read_gate={c.read_gate}" if c.read_gate is not None else "")
                + (f", serve_gate={c.serve_gate}" if c.serve_gate is not None else ""))


@contextlib.contextmanager
def training_gate(mems):
    """Within this block the memory layers ``mems`` (an iterable of ProductKeyMemory) gate their
    reads at ``read_gate`` even in eval mode: forwards that belong to training (SMF's selection)
    see what training sees, whatever ``serve_gate`` is."""
    mems = list(mems)
    before = [m.train_gate_forced for m in mems]
    for m in mems:
        m.train_gate_forced = True
    try:
        yield
    finally:
        for m, b in zip(mems, before):
            m.train_gate_forced = b
