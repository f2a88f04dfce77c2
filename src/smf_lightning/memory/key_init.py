"""Data-driven product keys: k-means on the query halves a memory layer really produces.

Random sub-keys (uniform, Lample et al. 2019) ignore where the queries of a pretrained
model actually lie. Hidden states of real LMs are anisotropic — a few directions carry
much of the variance — so for most tokens the same few sub-keys score highest and a few
*hub* slots take a large share of all reads (docs/design.md §9 measured ~10% of background
reads on the top 1% of slots). Hubs matter for SMF: updates for unrelated facts collide
there, and the background statistics call those slots "common" and never pick them.

The remedy (cf. the k-means key initialisation discussed by Lample et al. 2019,
§4.4, and the seed paper's data-driven retrofit): run the model over background text,
collect each memory layer's query halves (after ``query_norm``, per head), and put each
head's two sub-key tables at k-means centroids of its halves, ``sqrt(N)`` per table, so
that every sub-key is the best match for a similar share of real tokens.

Spherical k-means, not Euclidean: the layer ranks sub-keys by the dot product ``q · k``
(layer.py, ``lookup``). With sub-keys of equal norm, the best dot product is the highest
cosine, which is exactly the spherical k-means assignment — so the clusters k-means builds
are the sub-keys' real catchment areas. Centroids are unit-normalised and rescaled to the
mean norm of the keys they replace, which keeps the scale of the scores (and so the
sharpness of the layer's softmax) where the random initialisation put it.

Layers are initialised from the lowest up: in ``replace`` mode a lower memory layer's
output (and thus its keys) changes the hidden states a higher one sees.

``smf_lightning.selection.stats.slot_usage_stats`` measures the effect (touched share, hub
share) with the background statistics code; it lives in ``selection``, which imports
``memory`` (never the reverse), and its callers (stages/heal.py) call it themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layer import ProductKeyMemory
from .retrofit import memory_layers


class _StopAfterLayer(Exception):
    """Raised by a hook once the memory layer being initialised has seen its input:
    nothing above it is needed, so the rest of the forward pass is skipped."""


# ----------------------------------------------------------------------------- k-means


def spherical_kmeans(points: torch.Tensor, k: int, *, seed: int, iters: int = 20) -> torch.Tensor:
    """``k`` unit-norm centroids of the directions of ``points`` [M, d] (M >= k).

    k-means++ seeding on cosine distance (Arthur & Vassilvitskii 2007), then ``iters``
    Lloyd rounds (assign each point to its highest-cosine centroid; centroid = normalised
    sum of its points). A cluster that ends up empty is re-seeded with the point that fits
    its own centroid worst, so all ``k`` sub-keys stay in use. Deterministic for a seed
    on a given device (sampling uses a CPU ``torch.Generator``).
    """
    if points.dim() != 2:
        raise ValueError(f"spherical_kmeans expects points of shape [M, d], got {tuple(points.shape)}.")
    m = points.shape[0]
    if not 1 <= k <= m:
        raise ValueError(
            f"spherical_kmeans needs at least k={k} points to place k centroids, got {m}. "
            f"Give it more background text (more batches or longer sequences)."
        )
    if iters < 0:
        raise ValueError(f"iters={iters} must be >= 0.")
    x = F.normalize(points.float(), dim=-1)
    g = torch.Generator().manual_seed(int(seed))

    # k-means++: each next centroid is drawn with probability ∝ its distance² to the nearest
    # centroid so far (distance = 1 - cos, a proper proxy on the sphere).
    first = int(torch.randint(m, (1,), generator=g))
    centroids = [x[first]]
    best_cos = x @ x[first]
    for _ in range(1, k):
        weight = (1 - best_cos).clamp_min(0).square().double().cpu()
        if float(weight.sum()) <= 0:  # every point coincides with a centroid: take any unused point
            weight = torch.ones(m, dtype=torch.double)
        nxt = int(torch.multinomial(weight, 1, generator=g))
        centroids.append(x[nxt])
        best_cos = torch.maximum(best_cos, x @ x[nxt])
    c = torch.stack(centroids)

    for _ in range(iters):
        cos = x @ c.T  # [M, k]
        fit, assign = cos.max(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(sizes == 0).squeeze(1)
        new = F.normalize(sums, dim=-1)
        if empty.numel():
            worst = torch.argsort(fit, stable=True)[: empty.numel()]  # worst-fitting points first
            new[empty] = x[worst]
        if torch.equal(new, c):
            break
        c = new
    return c


# ----------------------------------------------------------------------------- queries


def query_halves(memory: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """[..., heads, 2, k_dim/2]: the query halves ``memory.lookup`` scores against its sub-keys."""
    return memory.query_halves(x)


@torch.no_grad()
def collect_query_halves(
    model: nn.Module,
    layer_idx: int,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    max_tokens: int,
) -> torch.Tensor:
    """Query halves [M, heads, 2, k_dim/2] (float32, CPU) of memory layer ``layer_idx`` over
    the real (non-padding) tokens of ``batches``; stops once ``max_tokens`` are collected
    (batches are used in order, so pass them already shuffled)."""
    memory = memory_layers(model)[layer_idx]
    device = next(model.parameters()).device
    chunks: list[torch.Tensor] = []
    state = {"mask": None, "n": 0}

    def grab(module, args):
        x = args[0]
        q = query_halves(module, x)
        mask = state["mask"]
        q = q[mask[:, -x.shape[1]:].bool()] if mask is not None else q.reshape(-1, *q.shape[2:])
        chunks.append(q.float().cpu())
        state["n"] += q.shape[0]
        raise _StopAfterLayer

    hook = memory.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if "input_ids" not in batch or "attention_mask" not in batch:
                raise ValueError(f"key-init batches need 'input_ids' and 'attention_mask'; got keys {sorted(batch)}.")
            state["mask"] = batch["attention_mask"].to(device)
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=state["mask"])
            except _StopAfterLayer:
                pass
            if state["n"] >= max_tokens:
                break
    finally:
        hook.remove()
        model.train(was_training)
    if not chunks:
        raise ValueError("no batches were given to collect queries from; pass background batches.")
    return torch.cat(chunks)[:max_tokens]


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def init_keys_kmeans(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    seed: int,
    iters: int = 20,
    max_tokens: int = 16384,
    progress: bool = False,
) -> dict[int, dict]:
    """Set every memory layer's sub-keys to spherical k-means centroids of its real queries.

    Args:
        model: a retrofitted model (``smf_lightning.memory.retrofit``). Only the ``keys`` of
            its memory layers change; every other parameter stays bit-identical.
        batches: background batches, dicts with ``input_ids`` and ``attention_mask`` [B, T]
            (e.g. ``FactStreamDataModule.background_batches()``); padding is excluded. Must
            be re-iterable (a list): every memory layer makes its own pass.
        seed: seeds k-means++ (head h, half j of layer i uses a seed derived from all four),
            so the same model, batches and seed give the same keys.
        iters: Lloyd iterations per sub-key table.
        max_tokens: tokens (queries) per layer used for k-means; k-means needs at least
            sqrt(N) of them, and tens per centroid to be meaningful.
        progress: show a tqdm bar over the sub-key tables.

    Returns, per memory layer: tokens used, and the mean cosine of each query half to its
    best sub-key before and after (higher = keys sit where the queries are).
    """
    from tqdm.auto import tqdm

    mems = memory_layers(model)
    if not mems:
        raise ValueError("model has no memory layers; retrofit it first (smf_lightning.memory.retrofit).")
    batches = list(batches)
    report: dict[int, dict] = {}
    bar = tqdm(total=sum(m.heads * 2 for m in mems.values()), desc="k-means keys", unit="table", disable=not progress)
    for layer_idx, mem in mems.items():  # lowest first: replace-mode outputs feed higher layers
        q = collect_query_halves(model, layer_idx, batches, max_tokens=max_tokens)
        if q.shape[0] < mem.n_sub:
            raise ValueError(
                f"memory layer {layer_idx}: k-means needs at least sqrt(N)={mem.n_sub} real tokens, but the "
                f"background batches hold only {q.shape[0]}. Use more or longer background sequences."
            )
        new_keys = torch.empty_like(mem.keys, dtype=torch.float32, device="cpu")
        fit_before, fit_after = [], []
        for h in range(mem.heads):
            for half in range(2):
                points = q[:, h, half]
                old = mem.keys[h, half].detach().float().cpu()
                table_seed = hash_seed(seed, layer_idx, h, half)
                centroids = spherical_kmeans(points, mem.n_sub, seed=table_seed, iters=iters)
                # equal norms: top dot product == top cosine (see module docstring)
                new_keys[h, half] = centroids * old.norm(dim=-1).mean()
                unit = F.normalize(points, dim=-1)
                fit_before.append(float((unit @ F.normalize(old, dim=-1).T).max(1).values.mean()))
                fit_after.append(float((unit @ centroids.T).max(1).values.mean()))
                bar.update(1)
        mem.keys.copy_(new_keys.to(device=mem.keys.device, dtype=mem.keys.dtype))
        report[layer_idx] = {
            "tokens": int(q.shape[0]),
            "centroids_per_table": mem.n_sub,
            "mean_best_cos_before": sum(fit_before) / len(fit_before),
            "mean_best_cos_after": sum(fit_after) / len(fit_after),
        }
    bar.close()
    return report


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python ``hash``: it is salted per process)."""
    h = 1469598103934665603
    for p in parts:
        for byte in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h >> 1
