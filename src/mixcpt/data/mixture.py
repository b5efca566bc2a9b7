"""Which documents of which source make up the mixture D_MIX: weights are shares of *tokens*.

Given each source's document lengths (in tokens) and its weight, the plan decides how many
tokens each source contributes and which documents, in which order, fill that share:

    share_i  = w_i / sum(w)                  the configured token share of source i
    total    = total_tokens if set, else     the largest mixture that needs no repeat
               min_i n_i / share_i           (oversample off: the scarcest source bounds it)
               max_i n_i / share_i           (oversample on: every document used at least once)
    target_i = share_i * total

Documents of a source are drawn in a seeded random order, a fresh permutation per pass (a
"repeat" of a small source is another pass), until the source reaches its target. A source
is never cut mid-document, so it overshoots its target by less than one document. All drawn
documents are then shuffled together with the same seed. The plan is a pure function of its
inputs: the same seed gives the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixcpt.errors import ConfigError


@dataclass
class MixturePlan:
    targets: list[int]  # tokens wanted per source
    # [n_docs_drawn, 2] int64 rows of (source index, document index), stream order
    order: np.ndarray

    def drawn_tokens(self, lengths: list[np.ndarray]) -> list[int]:
        """Tokens actually drawn per source."""
        out = [0] * len(lengths)
        for s, lens in enumerate(lengths):
            docs = self.order[self.order[:, 0] == s, 1]
            out[s] = int(lens[docs].sum())
        return out


def plan_mixture(
    lengths: list[np.ndarray],  # per source: [n_docs] tokens of each document
    weights: list[float],
    seed: int,
    total_tokens: int | None = None,
    oversample: bool = False,
    labels: list[str] | None = None,
    target_key: str = "total_tokens",
) -> MixturePlan:
    """Decide the documents of the mixture; see the module docstring for the rule. `target_key`
    is the config key that sets the total, named in the error when a source is too small."""
    labels = labels or [str(i) for i in range(len(lengths))]
    n = np.array([int(lens.sum()) for lens in lengths], dtype=np.float64)
    share = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    active = share > 0
    for i in np.flatnonzero(active & (n == 0)):
        raise ConfigError(f"data source '{labels[i]}' has weight {weights[i]} but holds no tokens")
    if total_tokens is None:
        per_source_total = n[active] / share[active]
        total = per_source_total.max() if oversample else per_source_total.min()
    else:
        total = float(total_tokens)
    targets = [int(round(s * total)) for s in share]
    if not oversample:
        for i, (t, have) in enumerate(zip(targets, n)):
            if t > have:
                raise ConfigError(
                    f"data: source '{labels[i]}' holds {int(have)} tokens but its share of "
                    f"{target_key} needs {t}; lower {target_key} or set data.oversample: true to "
                    "repeat it"
                )

    rng = np.random.default_rng(seed)
    rows = []
    for s, (lens, target) in enumerate(zip(lengths, targets)):
        drawn = 0
        while drawn < target:
            perm = rng.permutation(len(lens))
            cum = np.cumsum(lens[perm])
            # take documents until the one that reaches the target, inclusive
            stop = int(np.searchsorted(cum, target - drawn, side="left")) + 1
            take = perm[:stop]
            drawn += int(lens[take].sum())
            rows.append(np.stack([np.full(len(take), s), take], axis=1))
    order = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
    order = order[rng.permutation(len(order))]
    return MixturePlan(targets=targets, order=order.astype(np.int64))
