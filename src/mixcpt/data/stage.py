"""The data stage (`mixcpt data`): sources -> plain text -> tokens -> D_MIX, D_K, the pool and,
with `data.replay`, the replay stream D_R.

`run_data` runs these steps in order, each a function below:
    pass 1  stream every source, render instruction/preference samples to plain text
            (render.py), tokenise in batches (the fast tokenizer parallelises in Rust), append
            the tokens of each source to a flat int32 file; keep only document lengths in memory
    plan    choose the documents of the mixture by token shares (mixture.py)
    pass 2  copy the chosen documents, EOS-terminated, into fixed-length blocks (packing.py):
            D_MIX with the statistics of each source, then D_K (D_MIX's domain documents),
            then D_R (D_K's documents with general text replayed among them: data/replay.py)
    pool    keep the general samples that were drawn into D_MIX
    stats   write data_stats.json and the fingerprint record of the inputs

Outputs, all under `DIR/data/` (built in a temporary folder and renamed at the end):
    mix/      D_MIX, the stage-1 stream of the Mix-CPT arm
    domain/   D_K, the traditional arm's stream: the domain documents of D_MIX, in its order and
              with its repetitions (the same domain tokens per pass)
    replay/   D_R, the replay arm's stream, only when data.replay is set: D_K's documents
              interleaved with general pre-training text (mixcpt.data.replay)
    pool/     instructions.jsonl, preferences.jsonl: the general samples mixed into D_MIX,
              for selection and alignment (stage 2)
    data_stats.json, fingerprint.json
Rerunning with the same inputs (data config, seed, tokenizer files and source contents; see
mixcpt.stage_inputs) reuses the result.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from mixcpt.atomic import atomic_dir, write_json_atomic
from mixcpt.config import Config, SourceConfig
from mixcpt.config.data import SOURCE_GROUPS
from mixcpt.data.mixture import MixturePlan, plan_mixture
from mixcpt.data.packing import TokenizedSource, pack_documents
from mixcpt.data.readers import (
    alpaca_fields,
    domain_text,
    instruction_messages,
    preference_fields,
    read_records,
)
from mixcpt.data.render import render_messages, render_plain_prompt, render_plain_response
from mixcpt.data.replay import general_share, plan_replay
from mixcpt.fingerprints import begin, write_record
from mixcpt.models import load_tokenizer
from mixcpt.rundir import RunDir, base_model_path


def _render(
    group: str, rec, src: SourceConfig, cfg: Config, doc_id: str
) -> tuple[str, dict | None]:
    """(plain text of the document, pool row or None) for one record of a source."""
    if group in ("domain", "replay"):  # plain documents
        return domain_text(rec, src.text_field), None
    template = cfg.data.template
    if group == "instructions":
        messages = instruction_messages(rec)
        alpaca = alpaca_fields(rec)
        if alpaca:
            prompt, response = (
                render_plain_prompt(alpaca[0], alpaca[1], template),
                render_plain_response(alpaca[2], template),
            )
        else:
            prompt, response = render_messages(messages, template)
        row = {
            "id": doc_id,
            "source": src.label,
            "messages": messages,
            "plain_prompt": prompt,
            "plain_response": response,
        }
        return prompt + response, row
    prompt_msgs, chosen, rejected = preference_fields(rec)
    prompt, response = render_messages(
        [*prompt_msgs, {"role": "assistant", "content": chosen}], template
    )
    row = {
        "id": doc_id,
        "source": src.label,
        "messages": prompt_msgs,
        "chosen": chosen,
        "rejected": rejected,
        "plain_prompt": prompt,
    }
    return prompt + response, row


def _tokenize_source(
    group: str, src: SourceConfig, label: str, cfg: Config, tokenizer, work: Path
) -> TokenizedSource:
    """Pass 1 for one source: every document rendered, tokenised (BOS as the tokenizer adds it,
    EOS appended) and appended to `work/<label>.tokens`."""
    out = TokenizedSource(group, label, src.weight, work / f"{label}.tokens")
    if group in ("instructions", "preferences"):
        out.pool_path = work / f"{label}.pool.jsonl"
    lengths: list[int] = []
    batch: list[str] = []
    eos = tokenizer.eos_token_id
    with open(out.tokens_path, "wb") as tok_f, ExitStack() as stack:
        pool_f = (
            stack.enter_context(open(out.pool_path, "w", encoding="utf-8"))
            if out.pool_path
            else None
        )

        def flush() -> None:
            for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
                arr = np.asarray([*ids, eos], dtype=np.int32)
                tok_f.write(arr.tobytes())
                lengths.append(len(arr))
            batch.clear()

        for rec in tqdm(
            read_records(src), desc=f"tokenise {group}/{label}", unit="doc", leave=False
        ):
            text, row = _render(
                group, rec, src, cfg, f"{group}/{label}/{len(lengths) + len(batch)}"
            )
            if row is not None:
                pool_f.write(json.dumps(row, ensure_ascii=False) + "\n")
            batch.append(text)
            if len(batch) >= cfg.data.tokenize_batch_size:
                flush()
        if batch:
            flush()
    out.lengths = np.asarray(lengths, dtype=np.int64)
    return out


def run_data(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """Build D_MIX, D_K, the pool and (with data.replay) D_R under `run.data`; returns the
    statistics (also in results.json). Reuses an earlier build from the same inputs, unless
    `force`."""
    record = begin(cfg, run, "data", force)
    if record is None:
        return _earlier_build(run)
    # the packed streams carry it: the teacher cache is keyed on it
    fingerprint = record["fingerprint"]
    tokenizer_path = cfg.model.tokenizer or base_model_path(cfg.model, run.base)
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    t0 = time.perf_counter()
    with atomic_dir(run.data) as tmp:
        sources = _tokenize_sources(cfg, tokenizer, tmp / "_tokens")
        tokenize_s = time.perf_counter() - t0
        # the replay sources come last, so D_MIX's plan numbers the others as `sources` does
        mixed = [s for s in sources if s.group != "replay"]
        plan = _plan(cfg, mixed)
        packer = Packer(cfg.data.block_size, tokenizer.pad_token_id, fingerprint, tmp)
        mix = _pack_mix(plan, mixed, packer)
        domain = _pack_domain(plan, mixed, packer)
        pool = _write_pool(plan, mixed, tmp / "pool")
        stats = {"mix": mix, "domain": domain}
        if cfg.data.replay:
            share = cfg.data.replay_share or general_share(mix["sources"])
            stats["replay"] = _pack_replay(plan, sources, share, domain["n_tokens"], cfg, packer)
        shutil.rmtree(tmp / "_tokens")
        stats = {
            **stats,
            "pool": pool,
            **_tokenize_stats(sources, tokenize_s),
            "fingerprint": fingerprint,
        }
        _write_stats(tmp, stats, record)
    _record(run, stats)
    return stats


def _earlier_build(run: RunDir) -> dict:
    """The statistics of the build in `run.data`, copied into results.json if missing there."""
    stats = json.loads((run.data / "data_stats.json").read_text())
    if "data" not in run.read_results():  # a run killed between the rename and the results update
        _record(run, stats)
    return stats


def _tokenize_sources(cfg: Config, tokenizer, work: Path) -> list[TokenizedSource]:
    """Pass 1 for every source, group by group in config order, into the new folder `work`.

    A label that an earlier source already has becomes `<label>-<group><index>`, so that every
    source has its own token file and its own line in the statistics.
    """
    work.mkdir()
    sources: list[TokenizedSource] = []
    for group in SOURCE_GROUPS:
        for i, src in enumerate(getattr(cfg.data, group)):
            label = (
                src.label
                if all(src.label != s.label for s in sources)
                else f"{src.label}-{group}{i}"
            )
            sources.append(_tokenize_source(group, src, label, cfg, tokenizer, work))
    return sources


def _plan(cfg: Config, sources: list[TokenizedSource]) -> MixturePlan:
    """The documents of D_MIX, drawn by the sources' token shares with the run's seed."""
    return plan_mixture(
        [s.lengths for s in sources],
        [s.weight for s in sources],
        cfg.seed,
        cfg.data.total_tokens,
        cfg.data.oversample,
        [s.label for s in sources],
    )


class Packer(NamedTuple):
    """Pass 2's settings, the same for every stream: blocks of `block_size` tokens padded with
    `pad_id`, stamped with the data build's `fingerprint`, each stream in its folder under
    `root`."""

    block_size: int
    pad_id: int
    fingerprint: str
    root: Path

    def __call__(self, order: np.ndarray, sources: list[TokenizedSource], stream: str) -> dict:
        """Pack the documents of `order` into `root/<stream>` (`pack_documents`)."""
        folder, desc = self.root / stream, f"pack {STREAM_NAMES[stream]}"
        return pack_documents(
            order, sources, self.block_size, self.pad_id, folder, self.fingerprint, desc
        )


STREAM_NAMES = {"mix": "D_MIX", "domain": "D_K", "replay": "D_R"}


def _pack_mix(plan: MixturePlan, sources: list[TokenizedSource], pack: Packer) -> dict:
    """Pass 2 for D_MIX; returns `pack_documents`'s statistics plus, under "sources", the
    statistics of each source."""
    mix = pack(plan.order, sources, "mix")
    mix["sources"] = _source_stats(plan, sources)
    mix["unit"] = "tokens"
    return mix


def _source_stats(plan: MixturePlan, sources: list[TokenizedSource]) -> dict:
    """label -> what D_MIX holds of that source: documents drawn (with repeats and without),
    tokens drawn and available, and its share of the mixture against the share its weight asks."""
    drawn = plan.drawn_tokens([s.lengths for s in sources])
    total_drawn = sum(drawn)
    total_weight = sum(s.weight for s in sources)
    return {
        s.label: {
            "group": s.group,
            "documents": int((plan.order[:, 0] == i).sum()),
            "unique_documents": int(len(np.unique(plan.order[plan.order[:, 0] == i, 1]))),
            "tokens": drawn[i],
            "available_tokens": int(s.lengths.sum()),
            "share": drawn[i] / total_drawn if total_drawn else 0.0,
            "target_share": s.weight / total_weight,
        }
        for i, s in enumerate(sources)
    }


def _pack_domain(plan: MixturePlan, sources: list[TokenizedSource], pack: Packer) -> dict:
    """Pass 2 for D_K, the traditional arm's stream: exactly the domain documents
    drawn into D_MIX, in D_MIX's order and with its repetitions (oversampling), so that a pass over
    D_K trains on the same domain tokens as a pass over D_MIX (`mixcpt.train.stage` gives the
    traditional arm as many passes as Mix-CPT). Returns `pack_documents`'s statistics."""
    domain = np.isin(plan.order[:, 0], _domain_indices(sources))
    return pack(plan.order[domain], sources, "domain")


def _pack_replay(
    plan: MixturePlan,
    sources: list[TokenizedSource],
    share: float,
    domain_tokens: int,
    cfg: Config,
    pack: Packer,
) -> dict:
    """Pass 2 for D_R (mixcpt.data.replay): D_K's documents with `share` of the
    tokens drawn from the replay sources (the last of `sources`). Returns `pack_documents`'s
    statistics plus the domain and replayed tokens, the share achieved and asked, and under
    "sources" what each replay source gave."""
    replay = [s for s in sources if s.group == "replay"]
    first = len(sources) - len(replay)
    order, drawn = plan_replay(
        plan.order[np.isin(plan.order[:, 0], _domain_indices(sources))],
        domain_tokens,
        [s.lengths for s in replay],
        [s.weight for s in replay],
        share,
        cfg.seed,
        cfg.data.oversample,
        [s.label for s in replay],
        first,
    )
    stats = pack(order, sources, "replay")
    tokens = drawn.drawn_tokens([s.lengths for s in replay])
    total = domain_tokens + sum(tokens)
    stats.update(
        domain_tokens=domain_tokens,
        replay_tokens=sum(tokens),
        share=sum(tokens) / total if total else 0.0,
        target_share=share,
        unit="tokens",
        sources={
            s.label: {
                "documents": int((drawn.order[:, 0] == i).sum()),
                "tokens": tokens[i],
                "available_tokens": int(s.lengths.sum()),
            }
            for i, s in enumerate(replay)
        },
    )
    return stats


def _domain_indices(sources: list[TokenizedSource]) -> list[int]:
    """Where the domain sources are in `sources`."""
    return [i for i, s in enumerate(sources) if s.group == "domain"]


def _write_pool(plan: MixturePlan, sources: list[TokenizedSource], folder: Path) -> dict:
    """Write `folder`/instructions.jsonl and preferences.jsonl: the general samples that made it
    into D_MIX, each once, in source order. Returns group -> number of samples written."""
    folder.mkdir()
    counts = {}
    for group in ("instructions", "preferences"):
        n = 0
        with open(folder / f"{group}.jsonl", "w", encoding="utf-8") as out:
            for i, s in enumerate(sources):
                if s.group != group:
                    continue
                keep = set(plan.order[plan.order[:, 0] == i, 1].tolist())
                with open(s.pool_path, encoding="utf-8") as rows:
                    for d, line in enumerate(rows):
                        if d in keep:
                            out.write(line)
                            n += 1
        counts[group] = n
    return counts


def _tokenize_stats(sources: list[TokenizedSource], seconds: float) -> dict:
    """The tokens of every source together and the speed of pass 1, which took `seconds`."""
    available = int(sum(s.lengths.sum() for s in sources))
    return {
        "available_tokens": available,
        "tokenize_seconds": round(seconds, 3),
        "tokens_per_second": round(available / max(seconds, 1e-9), 1),
    }


def _write_stats(folder: Path, stats: dict, record: dict) -> None:
    """Write data_stats.json and the fingerprint record, by which a rerun with the same inputs
    reuses the build."""
    write_json_atomic(folder / "data_stats.json", stats)
    write_record(folder, record)


def _record(run: RunDir, stats: dict) -> None:
    """Copy the statistics of D_MIX, D_K, the pool and D_R (when built) into the "data" section
    of results.json."""
    for key in ("mix", "domain", "pool", "replay"):
        if key in stats:
            run.update_results("data", key, stats[key])
