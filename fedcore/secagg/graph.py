"""The sparse neighbour graph of a round (SecAgg+): who masks with and holds shares of whom.

Deterministic from the public round seed, so the trainer and every edge compute the same
graph without exchanging it: the sorted participants are shuffled (Fisher-Yates driven by
an AES-CTR stream keyed from the seed), laid on a ring, and each edge is joined to the
``k / 2`` edges on either side (a Harary graph on a random ordering). The graph is
symmetric and ``k``-regular; with ``k >= n - 1`` it is complete.

:func:`is_connected` checks the graph induced on the survivors: pairwise masks only cancel
inside a connected component, so a server unmasking a disconnected survivor set would learn
the partial sum of each component. Edges refuse to unmask such a set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from fedcore.secagg.prg import derive_key, mask

Graph = Mapping[str, tuple[str, ...]]


def _shuffle(items: Sequence[str], seed: bytes) -> list[str]:
    """A uniform permutation of ``items`` determined by ``seed`` (rejection-sampled draws)."""
    order = list(items)
    key = derive_key(seed, "graph-shuffle")
    length = 2 * len(order) + 64
    draws = mask(key, length)
    pos = 0
    for i in range(len(order) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 32) - (1 << 32) % bound
        while True:
            if pos == len(draws):
                length *= 2
                draws = mask(key, length)  # same key: a longer stream with the same prefix
            r = int(draws[pos])
            pos += 1
            if r < limit:
                break
        j = r % bound
        order[i], order[j] = order[j], order[i]
    return order


def build_graph(participants: Sequence[str], seed: bytes, k: int) -> dict[str, tuple[str, ...]]:
    """Each participant's neighbours (sorted), ``k`` even, from the public round ``seed``."""
    ids = sorted(participants)
    n = len(ids)
    if k >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    ring = _shuffle(ids, seed)
    graph: dict[str, tuple[str, ...]] = {}
    for p, u in enumerate(ring):
        near = {ring[(p + off) % n] for off in range(1, k // 2 + 1)}
        near |= {ring[(p - off) % n] for off in range(1, k // 2 + 1)}
        graph[u] = tuple(sorted(near))
    return graph


def is_connected(nodes: Collection[str], graph: Graph) -> bool:
    """Whether the subgraph of ``graph`` induced on ``nodes`` is connected (and non-empty)."""
    members = set(nodes)
    if not members:
        return False
    start = next(iter(members))
    seen = {start}
    stack = [start]
    while stack:
        u = stack.pop()
        for v in graph.get(u, ()):
            if v in members and v not in seen:
                seen.add(v)
                stack.append(v)
    return seen == members
