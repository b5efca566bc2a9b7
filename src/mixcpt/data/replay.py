"""The replay stream D_R (`DIR/data/replay/`): the traditional arm's domain documents with general
pre-training text replayed among them, the standard anti-forgetting baseline.

    D_R            = D_K's documents (the domain documents of D_MIX, in D_MIX's order, repeats
                     included) interleaved with documents drawn from the `data.replay` sources
    share          = data.replay_share, by default the general share of D_MIX's tokens
    replay tokens  = share / (1 - share) * D_K's tokens, split between the replay sources by
                     weight with `plan_mixture` (a seeded draw; a document is never cut; a source
                     repeats only with data.oversample)

The two parts are interleaved at seeded random positions, each keeping its own order. So a pass
over D_R trains on exactly the domain tokens of a pass over D_K (or D_MIX), and with the default
share D_R is about D_MIX's size: the replay arm differs from the mixture arms only in what fills
the general share (pre-training text instead of rendered instructions). A pure function of its
inputs: the same seed gives the same stream.
"""

from __future__ import annotations

import numpy as np

from mixcpt.data.mixture import MixturePlan, plan_mixture


def general_share(mix_sources: dict) -> float:
    """The share of D_MIX's tokens drawn from its instruction and preference sources, from the
    per-source statistics of the data stage ({label: {"group", "share", ...}})."""
    return sum(s["share"] for s in mix_sources.values() if s["group"] != "domain")


def plan_replay(
    domain_order: np.ndarray,  # [n_domain_docs, 2] (source index, document index), D_K's order
    domain_tokens: int,
    replay_lengths: list[np.ndarray],  # per replay source: [n_docs] tokens of each document
    weights: list[float],
    share: float,
    seed: int,
    oversample: bool,
    labels: list[str],
    first_index: int,
) -> tuple[np.ndarray, MixturePlan]:
    """(D_R's rows, in stream order, as (source index, document index) with the replay sources
    numbered from `first_index`; the plan of the replayed documents, numbered from 0). Raises
    ConfigError (from `plan_mixture`) when a replay source is too small without oversample."""
    # no domain tokens (D_MIX drew none: its share was all general): nothing to replay among
    wanted = round(share / (1 - share) * domain_tokens) if domain_tokens else 0
    plan = plan_mixture(replay_lengths, weights, seed, wanted, oversample, labels, "replay_share")
    replayed = plan.order + np.array([first_index, 0])
    n = len(domain_order) + len(replayed)
    is_domain = np.zeros(n, dtype=bool)
    is_domain[np.random.default_rng(seed).choice(n, len(domain_order), replace=False)] = True
    order = np.zeros((n, 2), dtype=np.int64)
    order[is_domain] = domain_order
    order[~is_domain] = replayed
    return order, plan
