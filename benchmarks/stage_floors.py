"""Each pipeline stage against its floor: the plainest way to do the same work, side by side.

    python benchmarks/stage_floors.py                  # every stage, one JSON line each
    python benchmarks/stage_floors.py --stage select   # one stage
    python benchmarks/stage_floors.py --quick          # tiny sizes: checks the script runs

Stages and their floors (ratio = ours / floor; below 1 means ours is faster):
    data      `run_data` (read, render, tokenise, mix, pack, write) / a bare batched pass of the
              fast tokenizer over the same rendered texts, already in memory
    cache     `build_teacher_cache` (top-k log-probs to disk) / a plain no-grad forward (logits)
              over the same blocks, same batch size
    select    `select_kind` (plain rendering, ppl score) / lm-evaluation-harness's HFLM
              `loglikelihood` on the same (prompt, response + EOS) requests
    mc        `multiple_choice_correct` / HFLM `loglikelihood` on the same (prompt, " " + choice)
    ppl       `perplexity_per_text` / HFLM `loglikelihood_rolling` on the same texts
    generate  `generate_answers` (batched) / an unbatched `model.generate` loop, same settings
    sft       one optimizer step of our SFT Trainer / of TRL's `SFTTrainer`, same batch
    dpo       one optimizer step of our DPOTrainer / of TRL's `DPOTrainer`, same pairs, both
              with precomputed reference log-probs (our default)
Stage 1 (the LSSD step) has its own benchmark, lssd_step.py.

Every variant runs on its own copy of the same Llama built from config (lssd_step.py's size by
default) with a BPE tokenizer trained on a generated corpus (data_throughput.py's). Variants are
interleaved round by round after warm-up rounds, and each figure is the median over rounds, so
load from other processes hits both sides alike. The scoring stages also check that both sides
give the same log-likelihoods (to 1e-4, relative); the training stages that both see the same
token ids and give the same first loss.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the JSON lines

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from mixcpt.config import TrainingConfig, config_from_dict  # noqa: E402
from mixcpt.malloc_tuning import keep_freed_memory  # noqa: E402
from mixcpt.train.arguments import training_arguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from data_throughput import generate as generate_corpus  # noqa: E402
from lssd_step import random_blocks, timed_step  # noqa: E402

STAGES = ("data", "cache", "select", "mc", "ppl", "generate", "sft", "dpo")
TOLERANCE = 1e-4  # relative agreement asked of two scorers of the same requests


# --- measuring -------------------------------------------------------------------------------


def interleaved(variants: dict, warmup: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU seconds (all threads of this process) of each zero-argument callable per
    round, the variants run in turn round by round (after `warmup` untimed rounds), so that a
    change in machine load hits every variant alike."""
    times = {name: {"wall": [], "cpu": []} for name in variants}
    for round_ in range(warmup + rounds):
        for name, run in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if round_ >= warmup:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def assert_close(ours: list[float], theirs: list[float], what: str) -> float:
    """The largest relative difference between two lists of log-likelihoods; fails above
    TOLERANCE (a benchmark of two scorers that disagree would compare different work)."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, theirs))
    assert worst <= TOLERANCE, f"{what}: log-likelihoods differ by {worst:.2e} (relative)"
    return worst


def result(stage: str, times: dict, ours: str, floor: str, **extra) -> dict:
    """The stage's JSON line. `ratio` is the median over rounds of ours / floor within a round
    (the two ran back to back, under the same load), steadier on a shared machine than the ratio
    of the medians, which is given too. `cpu_ratio` is the same from the CPU time this process
    spent: on a machine whose cores other jobs share, wall-clock time also counts the time the
    process waited for a core, which CPU time does not."""

    def paired(kind: str) -> list[float]:
        return [a / b for a, b in zip(times[ours][kind], times[floor][kind])]

    median = {name: statistics.median(t["wall"]) for name, t in times.items()}
    return {
        "benchmark": "stage_floors",
        "stage": stage,
        "seconds": {name: round(s, 4) for name, s in median.items()},
        "cpu_seconds": {name: round(statistics.median(t["cpu"]), 4) for name, t in times.items()},
        "ratio": round(statistics.median(paired("wall")), 3),
        "ratio_is": f"{ours} / {floor}",
        "cpu_ratio": round(statistics.median(paired("cpu")), 3),
        "ratio_of_medians": round(median[ours] / median[floor], 3),
        "round_ratios": [round(r, 3) for r in paired("wall")],
        **extra,
    }


# --- shared inputs ---------------------------------------------------------------------------


class Inputs:
    """The generated corpus (jsonl files and a BPE tokenizer trained on it) under a temporary
    folder, and a factory of identical Llama copies sized to that tokenizer."""

    def __init__(self, a):
        self.a = a
        self.tmp = tempfile.TemporaryDirectory()
        self.folder = Path(self.tmp.name)
        generate_corpus(self.folder, a.mb)
        # data_throughput trains 8,192 tokens; the quick run wants a tiny vocabulary
        if a.quick:
            from mixcpt.demo.tokenizer import train_bpe_tokenizer

            texts = [json.loads(line)["text"] for line in open(self.folder / "domain.jsonl")]
            train_bpe_tokenizer(texts[:200], vocab_size=512).save_pretrained(self.folder / "tok")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self.folder / "tok")
        self.cfg = config_from_dict(
            {
                "model": {"path": "tok"},
                "data": {
                    "domain": [{"path": "domain.jsonl", "weight": 0.8}],
                    "instructions": [{"path": "instructions.jsonl", "weight": 0.1}],
                    "preferences": [{"path": "preferences.jsonl", "weight": 0.1}],
                    "block_size": a.seq,
                },
                "select": {"batch_size": a.batch, "max_length": 1024},
            },
            root=self.folder,
        )
        self.base = self.llama(len(self.tokenizer))

    def llama(self, vocab: int) -> LlamaForCausalLM:
        """A Llama of the benchmark's size with `vocab` tokens, random weights (seed 0)."""
        a = self.a
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=a.hidden,
                intermediate_size=a.intermediate,
                num_hidden_layers=a.layers,
                num_attention_heads=a.heads,
                num_key_value_heads=a.heads,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        ).eval()

    def model(self) -> LlamaForCausalLM:
        """A copy of the model the text stages share (its vocabulary: the tokenizer's)."""
        return copy.deepcopy(self.base)

    def records(self, name: str, n: int) -> list[dict]:
        with open(self.folder / name) as f:
            return [json.loads(line) for line, _ in zip(f, range(n))]

    def texts(self, n: int) -> list[str]:
        return [r["text"] for r in self.records("domain.jsonl", n)]


def hflm(model, tokenizer, a, **kwargs):
    """lm-evaluation-harness's HF backend around the in-memory model (what `mixcpt eval` hands
    lm-eval tasks to), quiet."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=a.batch, **kwargs)


def instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


# --- stages ----------------------------------------------------------------------------------


def stage_data(inp: Inputs, a) -> dict:
    from mixcpt.data.readers import read_records
    from mixcpt.data.stage import _render, run_data
    from mixcpt.rundir import RunDir

    cfg, tok = inp.cfg, inp.tokenizer
    # the floor's input: every document's rendered text, as pass 1 renders it, in memory
    texts = [
        _render(group, rec, src, cfg, "")[0]
        for group in ("domain", "instructions", "preferences")
        for src in getattr(cfg.data, group)
        for rec in read_records(src)
    ]
    size = cfg.data.tokenize_batch_size
    runs = iter(range(10**6))

    def ours():
        with contextlib.redirect_stdout(io.StringIO()):  # its progress notes: not our JSON line
            run_data(cfg, RunDir(inp.folder / f"run{next(runs)}"), force=True)

    def floor():
        for start in range(0, len(texts), size):
            tok(texts[start : start + size], add_special_tokens=True)["input_ids"]

    times = interleaved({"mixcpt_data": ours, "tokenize_only": floor}, a.warmup, a.rounds)
    n_tokens = sum(len(ids) + 1 for ids in tok(texts)["input_ids"])  # + EOS per document
    return result(
        "data",
        times,
        "mixcpt_data",
        "tokenize_only",
        documents=len(texts),
        tokens=n_tokens,
        input_mb=round(sum(p.stat().st_size for p in inp.folder.glob("*.jsonl")) / 1e6, 1),
        mixcpt_tokens_per_s=round(n_tokens / statistics.median(times["mixcpt_data"]["wall"])),
    )


def stage_cache(inp: Inputs, a) -> dict:
    from mixcpt.train.teacher_cache import build_teacher_cache

    # random token blocks need no tokenizer; the vocabulary is lssd_step.py's (the generated
    # corpus's tokenizer has under 2k tokens, where the top 64 would be a twentieth of it)
    model = inp.llama(a.vocab)
    blocks_args = argparse.Namespace(batch=a.blocks, seq=a.seq, vocab=a.vocab)
    blocks = random_blocks(inp.folder / "blocks", blocks_args)
    batches = [
        {
            k: torch.stack([torch.as_tensor(blocks[i][k]) for i in rows])
            for k in ("input_ids", "position_ids")
        }
        for rows in (
            range(s, min(s + a.batch, len(blocks))) for s in range(0, len(blocks), a.batch)
        )
    ]
    builds = iter(range(10**6))

    def ours():
        build_teacher_cache(
            model, blocks, inp.folder / f"cache{next(builds)}", a.top_k, 1.0, a.batch
        )

    @torch.no_grad()
    def floor():
        for batch in batches:
            model(**batch, use_cache=False)  # logits included

    times = interleaved({"build_teacher_cache": ours, "forward": floor}, a.warmup, a.rounds)
    return result(
        "cache",
        times,
        "build_teacher_cache",
        "forward",
        blocks=len(blocks),
        block_size=a.seq,
        vocab=a.vocab,
        top_k=a.top_k,
        target=1.15,
    )


def stage_select(inp: Inputs, a) -> dict:
    from mixcpt.align.select import select_kind
    from mixcpt.data.render import render_plain_prompt, render_plain_response
    from mixcpt.responses import encode_plain

    tok, template = inp.tokenizer, inp.cfg.data.template
    rows = []
    for i, r in enumerate(inp.records("instructions.jsonl", a.samples)):
        rows.append(
            {
                "id": str(i),
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ],
                "plain_prompt": render_plain_prompt(r["instruction"], "", template),
                "plain_response": render_plain_response(r["output"], template),
            }
        )
    model = inp.model()
    lm = hflm(model, tok, a, max_length=inp.cfg.select.max_length)
    # the stage-1 rendering ends the response with EOS: lm-eval reads "</s>" as that token
    requests = instances(
        "loglikelihood", [(r["plain_prompt"], r["plain_response"] + tok.eos_token) for r in rows]
    )
    out = {}

    def ours():
        out["ours"] = select_kind(model, tok, rows, "instruction", inp.cfg)[1]

    def theirs():
        out["lm_eval"] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]

    times = interleaved({"mixcpt_select": ours, "lm_eval_hflm": theirs}, a.warmup, a.rounds)
    # lm-eval moves the prompt's trailing newline into the continuation, so it scores one token
    # more per request over the very same ids (same forwards). For the answers, lm-eval's scorer
    # gets our split of those ids.
    split = [((), *encode_plain(tok, r["plain_prompt"], r["plain_response"])) for r in rows]
    theirs_on_our_split = [ll for ll, _ in lm._loglikelihood_tokens(split, disable_tqdm=True)]
    sums = [-r["nll"] * r["n_response_tokens"] for r in out["ours"]]
    worst = assert_close(sums, theirs_on_our_split, "select")
    return result(
        "select",
        times,
        "mixcpt_select",
        "lm_eval_hflm",
        requests=len(rows),
        max_rel_diff=worst,
        target=1.0,
    )


def multiple_choice_items(inp: Inputs, n: int) -> tuple[list[str], list[dict]]:
    from mixcpt.data.render import render_plain_prompt

    rng = np.random.default_rng(1)
    records = inp.records("instructions.jsonl", n)
    words = " ".join(r["output"] for r in records).split()
    prompts, items = [], []
    for r in records:
        prompts.append(render_plain_prompt(r["instruction"], "", inp.cfg.data.template))
        choices = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(4)]
        items.append({"question": r["instruction"], "choices": choices, "answer": 0})
    return prompts, items


def stage_mc(inp: Inputs, a) -> dict:
    from mixcpt.evaluate.scoring import loglikelihoods, mean_scores, multiple_choice_correct

    tok = inp.tokenizer
    prompts, items = multiple_choice_items(inp, a.samples)
    pairs = [
        (prompt, ("" if prompt[-1:].isspace() else " ") + choice)
        for prompt, item in zip(prompts, items)
        for choice in item["choices"]
    ]
    model = inp.model()
    lm = hflm(model, tok, a, max_length=a.max_length)
    requests = instances("loglikelihood", pairs)
    scores = {}

    def ours():
        scores["ours"] = mean_scores(
            multiple_choice_correct(model, tok, prompts, items, a.batch, a.max_length)
        )

    def theirs():
        scores["lm_eval"] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]

    times = interleaved({"mixcpt_mc": ours, "lm_eval_hflm": theirs}, a.warmup, a.rounds)
    lls = loglikelihoods(model, tok, pairs, a.batch, a.max_length)
    worst = assert_close(lls, scores["lm_eval"], "multiple choice")
    return result(
        "mc",
        times,
        "mixcpt_mc",
        "lm_eval_hflm",
        requests=len(pairs),
        max_rel_diff=worst,
        target=1.0,
    )


def stage_ppl(inp: Inputs, a) -> dict:
    from mixcpt.evaluate.scoring import perplexity_per_text, perplexity_scores

    tok = inp.tokenizer
    texts = inp.texts(a.texts)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    assert max(lengths) < a.ppl_max_length, "a text longer than a window: raise --ppl-max-length"
    lengths = sum(lengths)
    model = inp.model()
    # lm-eval predicts every token of tok_encode(text) after a BOS prefix; ours predicts every
    # token after the text's own BOS. Without lm-eval adding BOS the two score the same tokens.
    # Texts longer than a window are cut alike but conditioned differently: lm-eval gives a
    # text's last window the full context (overlapping the previous window), ours conditions
    # every window on its first token only; so every text here fits in one window.
    lm = hflm(model, tok, a, max_length=a.ppl_max_length, add_bos_token=False)
    requests = instances("loglikelihood_rolling", [(t,) for t in texts])
    out = {}

    def ours():
        out["ours"] = perplexity_scores(
            perplexity_per_text(model, tok, texts, a.batch, a.ppl_max_length)
        )

    def theirs():
        out["lm_eval"] = lm.loglikelihood_rolling(requests, disable_tqdm=True)

    times = interleaved({"mixcpt_ppl": ours, "lm_eval_hflm": theirs}, a.warmup, a.rounds)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ours_total = -out["ours"]["bits_per_byte"] * np.log(2) * n_bytes
    worst = assert_close([ours_total], [sum(out["lm_eval"])], "perplexity")
    return result(
        "ppl",
        times,
        "mixcpt_ppl",
        "lm_eval_hflm",
        texts=len(texts),
        tokens=lengths,
        max_length=a.ppl_max_length,
        max_rel_diff=worst,
        target=1.0,
    )


def stage_generate(inp: Inputs, a) -> dict:
    from mixcpt.evaluate.scoring import encode, generate_answers

    tok = inp.tokenizer
    prompts, _ = multiple_choice_items(inp, a.prompts)
    model = inp.model()
    stop = ("\n",)
    out = {}

    def ours():
        out["ours"] = generate_answers(model, tok, prompts, a.new_tokens, stop, a.batch)

    @torch.inference_mode()
    def one_by_one():
        texts = []
        for prompt in prompts:
            ids = torch.tensor([encode(tok, prompt)])
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=a.new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                stop_strings=list(stop),
                tokenizer=tok,
            )
            text = tok.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            texts.append(text.split(stop[0], 1)[0])
        out["unbatched"] = texts

    times = interleaved(
        {"mixcpt_generate": ours, "unbatched_generate": one_by_one}, a.warmup, a.rounds
    )
    # greedy decoding of a random model: near-ties can flip between batched and unbatched
    # arithmetic, so agreement is reported rather than asserted
    same = sum(x == y for x, y in zip(out["ours"], out["unbatched"]))
    return result(
        "generate",
        times,
        "mixcpt_generate",
        "unbatched_generate",
        prompts=len(prompts),
        max_new_tokens=a.new_tokens,
        batch_size=a.batch,
        same_outputs=f"{same}/{len(prompts)}",
    )


def _trainer_settings(a, folder: Path) -> dict:
    """The TrainingArguments mixcpt's alignment stages build (train.arguments), as keyword
    arguments for TRL's config: same optimizer, learning rate, schedule and precision."""
    tc = TrainingConfig(
        learning_rate=1e-5, max_steps=1, per_device_batch_size=a.batch, lr_scheduler="constant"
    )
    ours = training_arguments(tc, folder, seed=0, remove_unused_columns=False, disable_tqdm=True)
    keys = (
        "learning_rate",
        "lr_scheduler_type",
        "weight_decay",
        "max_steps",
        "per_device_train_batch_size",
        "optim",
        "seed",
        "use_cpu",
        "bf16",
        "fp16",
        "dataloader_pin_memory",
    )
    return ours, {k: getattr(ours, k) for k in keys}


def chat_rows(inp: Inputs, n: int, pairs: bool) -> list[dict]:
    rows = []
    for r in inp.records("preferences.jsonl" if pairs else "instructions.jsonl", n):
        if pairs:
            rows.append(
                {
                    "messages": [{"role": "user", "content": r["prompt"]}],
                    "chosen": r["chosen"],
                    "rejected": r["rejected"],
                }
            )
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
            )
    return rows


def stage_sft(inp: Inputs, a) -> dict:
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    from mixcpt.align import sft as sft_stage
    from mixcpt.align.sft import sft_features
    from mixcpt.responses import pad_batch

    tok = inp.tokenizer
    rows = sft_features(chat_rows(inp, a.batch, pairs=False), tok, 1024, "bench")
    args, shared = _trainer_settings(a, inp.folder / "sft_ours")
    # what run_sft trains with (before its fused loss, the plain Trainer: for before/after runs)
    trainer_class = getattr(sft_stage, "SFTTrainer", Trainer)
    ours = trainer_class(
        model=inp.model().train(),
        args=args,
        train_dataset=rows,
        data_collator=partial(pad_batch, pad_token_id=tok.pad_token_id),
    )
    # TRL gets the very same token ids, pre-tokenised, with a completion mask for its
    # completion-only loss (TRL's own chat tokenisation is not what is being measured)
    dataset = Dataset.from_list(
        [
            {
                "input_ids": r["input_ids"],
                "completion_mask": [int(label != -100) for label in r["labels"]],
            }
            for r in rows
        ]
    )
    config = SFTConfig(
        output_dir=str(inp.folder / "sft_trl"),
        report_to=[],
        disable_tqdm=True,
        completion_only_loss=True,
        shuffle_dataset=False,
        max_length=None,
        **shared,
    )
    theirs = SFTTrainer(
        model=inp.model().train(), args=config, train_dataset=dataset, processing_class=tok
    )
    ours_batch = pad_batch(rows, tok.pad_token_id)
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(rows))])
    assert torch.equal(trl_batch["input_ids"], ours_batch["input_ids"])
    assert torch.equal(trl_batch["labels"], ours_batch["labels"])
    return _train_steps(a, "sft", ours, ours_batch, theirs, trl_batch, tokens=len(rows[0]))


def stage_dpo(inp: Inputs, a) -> dict:
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from mixcpt.align.dpo import DPOTrainer, pair_collate, pair_features, precompute_reference

    tok = inp.tokenizer
    raw = chat_rows(inp, a.batch, pairs=True)
    pairs = pair_features(raw, tok, 1024, "bench")
    args, shared = _trainer_settings(a, inp.folder / "dpo_ours")
    ours_model = inp.model().train()
    ours = DPOTrainer(
        model=ours_model,
        args=args,
        train_dataset=pairs,
        beta=0.1,
        data_collator=partial(pair_collate, pad_token_id=tok.pad_token_id),
    )
    precompute_reference(ours_model, pairs, a.batch, tok.pad_token_id)
    ours_model.train()
    # TRL tokenises the conversational pairs itself with the same chat template; the ids are
    # checked equal below
    dataset = Dataset.from_list(
        [
            {
                "prompt": r["messages"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in raw
        ]
    )
    config = DPOConfig(
        output_dir=str(inp.folder / "dpo_trl"),
        report_to=[],
        disable_tqdm=True,
        beta=0.1,
        precompute_ref_log_probs=True,
        max_length=None,
        **shared,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TRLDPOTrainer(
            model=inp.model().train(), args=config, train_dataset=dataset, processing_class=tok
        )
    ours_batch = pair_collate(pairs, tok.pad_token_id)
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(pairs))])
    assert torch.equal(trl_batch["input_ids"], ours_batch["input_ids"])
    assert torch.equal(trl_batch["completion_mask"].bool(), ours_batch["labels"] != -100)
    assert torch.allclose(trl_batch["ref_chosen_logps"], ours_batch["ref_chosen_logps"], 1e-4)
    return _train_steps(
        a, "dpo", ours, ours_batch, theirs, trl_batch, tokens=ours_batch["input_ids"].numel()
    )


def _train_steps(a, stage, ours, ours_batch, theirs, trl_batch, tokens) -> dict:
    """Optimizer steps of both trainers on their (equal) batches, interleaved; the first step's
    losses must agree, as both trainers compute the same loss."""

    def step(trainer, batch):
        return lambda: timed_step(trainer, batch, torch.device("cpu"))

    first = {
        name: trainer.compute_loss(trainer.model, dict(batch)).item()
        for name, trainer, batch in (("ours", ours, ours_batch), ("trl", theirs, trl_batch))
    }
    assert abs(first["ours"] - first["trl"]) <= 1e-4 * max(1.0, abs(first["trl"])), first
    times = interleaved(
        {
            f"mixcpt_{stage}": step(ours, ours_batch),
            f"trl_{stage}": step(theirs, trl_batch),
        },
        a.warmup,
        a.rounds,
    )
    return result(
        stage,
        times,
        f"mixcpt_{stage}",
        f"trl_{stage}",
        batch=dict(ours_batch)["input_ids"].shape[0],
        seq=dict(ours_batch)["input_ids"].shape[1],
        first_loss=first,
        target=1.0,
    )


# --- command line ----------------------------------------------------------------------------


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds a stage")
    sizes = {  # name: (default, --quick)
        "hidden": (192, 16),
        "intermediate": (512, 32),
        "layers": (4, 1),
        "heads": (4, 2),
        "batch": (8, 2),
        "seq": (256, 32),
        "blocks": (128, 4),  # cache: blocks of --seq tokens
        "vocab": (8192, 256),  # cache (the text stages' vocabulary is the tokenizer's)
        "top_k": (64, 4),
        "samples": (64, 6),  # select: instruction rows; mc: questions of 4 choices
        "texts": (24, 3),  # ppl
        "prompts": (16, 3),  # generate
        "new_tokens": (24, 4),
        "max_length": (256, 32),  # mc
        "ppl_max_length": (1024, 1024),  # every text in one window (see stage_ppl)
        "warmup": (1, 0),
        "rounds": (9, 1),
    }
    for name, (default, quick) in sizes.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
        ap.set_defaults(**{f"_{name}": (default, quick)})
    ap.add_argument("--mb", type=float, default=None, help="generated corpus (data stage input)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    return ap


def main() -> None:
    a = arguments().parse_args()
    for name, value in list(vars(a).items()):
        if name.startswith("_"):
            key = name[1:]
            if getattr(a, key) is None:
                setattr(a, key, value[1] if a.quick else value[0])
    if a.mb is None:
        a.mb = 0.05 if a.quick else 2.0
    if a.threads:
        torch.set_num_threads(a.threads)
    a.malloc_tuned = keep_freed_memory()  # as every mixcpt stage runs
    logging.disable(logging.WARNING)  # truncation and dataset notices would interleave too
    inp = Inputs(a)
    for stage in STAGES if a.stage == "all" else (a.stage,):
        figures = globals()[f"stage_{stage}"](inp, a)
        figures.setdefault("vocab", len(inp.tokenizer))
        figures.update(cpu_threads=torch.get_num_threads(), quick=a.quick)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
