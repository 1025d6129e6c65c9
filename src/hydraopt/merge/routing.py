"""Hard routing for M < K: which tasks share a head.

For a fixed A', the squared-Frobenius error of a routing is a k-means objective on the projected
heads P_i = B_i A_i A'^T (see :mod:`closed_form`), so we alternate

    routing <- Lloyd steps on P (A' fixed)      A' <- closed form (routing fixed)

which never increases the error, from several k-means++ starts, and keep the best per module.
Distances between heads come from their K x K Gram matrix, so every step is batched over modules.
"""

from __future__ import annotations

import torch

from hydraopt.merge.closed_form import FLOAT32_GRAM_FROM, projected_heads, shared_a

GRAM_COLUMNS = 4096  # many adapters: columns of the flattened heads per float32 product


def _gram(projected: torch.Tensor) -> torch.Tensor:
    """<P_i, P_j> (G, K, K) in float64.

    Many adapters (K >= FLOAT32_GRAM_FROM, float32 heads): a (K x d r)(d r x K) product, 131
    GFLOP per 1B module at K = 1,000, so it runs in float32 on GRAM_COLUMNS columns at a time
    (2x float64's speed here), the partial Grams summed in float64.
    """
    K = projected.shape[1]
    flat = projected.flatten(2)  # (G, K, d*r)
    if K < FLOAT32_GRAM_FROM or flat.dtype != torch.float32:
        flat = flat.to(torch.float64)
        return flat @ flat.transpose(1, 2)
    gram = torch.zeros(flat.shape[0], K, K, dtype=torch.float64, device=flat.device)
    for lo in range(0, flat.shape[2], GRAM_COLUMNS):
        part = flat[:, :, lo : lo + GRAM_COLUMNS]
        gram += (part @ part.transpose(1, 2)).to(torch.float64)
    return gram


def _distances_to_clusters(gram: torch.Tensor, routing: torch.Tensor, m: int) -> torch.Tensor:
    """||P_i - mean_c||^2 for every task i and head c (G, K, M); empty heads get +inf."""
    onehot = torch.nn.functional.one_hot(routing, m).to(gram.dtype)  # (G, K, M)
    counts = onehot.sum(dim=1)  # (G, M)
    safe = counts.clamp_min(1.0)
    cross = gram @ onehot / safe[:, None, :]  # (G, K, M): <P_i, mean_c>
    within = torch.einsum("gkm,gkl,glm->gm", onehot, gram, onehot) / safe.square()  # ||mean_c||^2
    diag = gram.diagonal(dim1=1, dim2=2)  # (G, K)
    dist = diag[:, :, None] - 2 * cross + within[:, None, :]
    return torch.where(counts[:, None, :] > 0, dist, torch.inf)


def _fill_empty(routing: torch.Tensor, dist: torch.Tensor, m: int) -> torch.Tensor:
    """Give each empty head the task farthest from its own head (M <= K, so none stays empty)."""
    routing = routing.clone()
    for g in range(routing.shape[0]):
        for _ in range(m):
            counts = torch.bincount(routing[g], minlength=m)
            empty = (counts == 0).nonzero()
            if len(empty) == 0:
                break
            own = dist[g].gather(1, routing[g][:, None]).squeeze(1)
            own = torch.where(counts[routing[g]] > 1, own, -torch.inf)  # never empty another head
            routing[g, int(own.argmax())] = int(empty[0])
    return routing


def lloyd(gram: torch.Tensor, routing: torch.Tensor, m: int, max_iter: int = 50) -> torch.Tensor:
    """Lloyd iterations from ``routing`` until no task moves."""
    for _ in range(max_iter):
        dist = _distances_to_clusters(gram, routing, m)
        new = _fill_empty(dist.argmin(dim=2), dist, m)
        if torch.equal(new, routing):
            break
        routing = new
    return routing


FLOAT32_SEARCH_FROM = 16  # K above which the routing search runs in float32
SCREEN_STARTS_FROM = 16  # K above which only the best k-means++ start is alternated


def kmeans_pp(gram: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on Gram distances; returns an initial routing (G, K)."""
    G, K, _ = gram.shape
    diag = gram.diagonal(dim1=1, dim2=2)
    pair = (diag[:, :, None] + diag[:, None, :] - 2 * gram).clamp_min(0.0)  # (G, K, K)
    centers = torch.empty(G, m, dtype=torch.long, device=gram.device)
    first = torch.randint(K, (G,), generator=generator, device=gram.device)
    centers[:, 0] = first
    nearest = pair[torch.arange(G), first]  # (G, K)
    for c in range(1, m):
        probs = nearest.clamp_min(0) + 1e-300
        pick = torch.multinomial(probs / probs.sum(1, keepdim=True), 1, generator=generator)[:, 0]
        centers[:, c] = pick
        nearest = torch.minimum(nearest, pair[torch.arange(G), pick])
    to_centers = pair.gather(2, centers[:, None, :].expand(G, K, m))  # (G, K, M)
    routing = to_centers.argmin(dim=2)
    # each center routes to itself even if another center is at distance 0
    routing.scatter_(1, centers, torch.arange(m, device=gram.device).expand(G, m))
    return routing


def _kmeans_objective(gram: torch.Tensor, routing: torch.Tensor, m: int) -> torch.Tensor:
    """Sum over tasks of the squared distance to their head's mean (G,)."""
    dist = _distances_to_clusters(gram, routing, m)
    return dist.gather(2, routing[:, :, None]).squeeze(2).sum(1)


def canonical_labels(routing: torch.Tensor) -> torch.Tensor:
    """Relabel heads in order of first use per module, so equal partitions compare equal (G, K)."""
    G, K = routing.shape
    first = torch.full((G, K), K, dtype=torch.long, device=routing.device)
    positions = torch.arange(K, device=routing.device).expand(G, K)
    first.scatter_reduce_(1, routing, positions, reduce="amin")  # first task of each head
    rank = first.argsort(dim=1).argsort(dim=1)  # head -> its order of first use
    return rank.gather(1, routing)


def distinct_partitions(starts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``starts`` without those that partition every module's tasks like an earlier one."""
    kept: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    for routing in starts:
        key = canonical_labels(routing)
        if not any(torch.equal(key, other) for other in seen):
            kept.append(routing)
            seen.append(key)
    return kept


def _best_start(gram: torch.Tensor, starts: list[torch.Tensor], m: int) -> torch.Tensor:
    """Per module, the routing among ``starts`` with the lowest k-means objective on ``gram``."""
    objectives = torch.stack([_kmeans_objective(gram, r, m) for r in starts])  # (S, G)
    pick = objectives.argmin(0)  # (G,)
    return torch.stack(starts)[pick, torch.arange(gram.shape[0], device=gram.device)]


def best_routing(
    A: torch.Tensor,
    scaled_B: torch.Tensor,
    num_heads: int,
    *,
    generator: torch.Generator,
    restarts: int = 8,
    max_alternations: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing and A' that minimise the squared Frobenius error, per module.

    Returns:
        routing (G, K), A' (G, r, k), squared error (G,).
    """
    G, K = A.shape[:2]
    m = num_heads
    identity = torch.arange(K, device=A.device).expand(G, K).clone()
    if m == K:
        a_prime, err = shared_a(A, scaled_B, identity, K)
        return identity, a_prime, err
    if m == 1:
        zeros = torch.zeros_like(identity)
        a_prime, err = shared_a(A, scaled_B, zeros, 1)
        return zeros, a_prime, err
    # Many adapters: search in float32 (the k x k Grams of the clusters dominate the cost and
    # rounding there cannot change which routing wins by much), then redo the winner in float64.
    # From FLOAT32_GRAM_FROM tasks the float64 closed form itself runs its big products in
    # float32 (sums in float64): as fast as the float32 search and more exact, so the search
    # uses it and the winner needs no redo (at K = 1,000 the redo was a sixth of the search).
    search = torch.float32 if FLOAT32_SEARCH_FROM < K < FLOAT32_GRAM_FROM else torch.float64
    # Start from the M = K subspace: it is where every task is represented best.
    a_full, _ = shared_a(A, scaled_B, identity, K, dtype=search)
    gram0 = _gram(projected_heads(A, scaled_B, a_full))
    best_err = torch.full((G,), torch.inf, dtype=torch.float64, device=A.device)
    best_routing = identity.clone()
    best_a = a_full.clone()
    starts = [lloyd(gram0, kmeans_pp(gram0, m, generator), m) for _ in range(max(1, restarts))]
    # With few tasks most starts end in the same partition: alternate from each one only once.
    starts = distinct_partitions(starts)
    if K > SCREEN_STARTS_FROM:
        # Many adapters: each alternation solves a k x k problem per cluster, so alternate only
        # from the start that is best on the M = K subspace (the k-means objective on gram0).
        starts = [_best_start(gram0, starts, m)]
    for routing in starts:
        a_prime, err = shared_a(A, scaled_B, routing, m, dtype=search)
        for _ in range(max_alternations):
            new = lloyd(_gram(projected_heads(A, scaled_B, a_prime)), routing, m)
            if torch.equal(new, routing):
                break
            routing = new
            a_prime, err = shared_a(A, scaled_B, routing, m, dtype=search)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_routing[better] = routing[better]
        best_a[better] = a_prime[better]
    if search != torch.float64:
        best_a, best_err = shared_a(A, scaled_B, best_routing, m)
    return best_routing, best_a, best_err
