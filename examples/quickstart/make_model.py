"""Build the quickstart's tiny base model, examples/quickstart/model/ (committed: no need to run).

A stand-in for a real pretrained model, small enough to commit (1.4 MB) and to train on a laptop:
  1. a byte-level BPE tokenizer (mixcpt.demo's, with its chat template) trained on all the
     quickstart text, the domain corpus included, so domain words split into sensible pieces;
  2. a Llama-architecture causal LM (4 layers, hidden 64, 330k parameters) pretrained from
     scratch with plain cross-entropy on *general* text only: pretrain/general.jsonl (everyday
     facts), pretrain/general_qa.jsonl (questions about them, in the plain template and in the
     chat template) and the general instruction and preference data of data/, rendered as plain
     text exactly as mixcpt's stage 1 renders them.
It has never seen a word about Kelmora, the made-up island of the domain corpus.

Seeded: the same seed gives the same model on the same machine (float rounding may differ
across CPUs and thread counts). About 1 minute on 2 CPU cores:

    python examples/quickstart/make_model.py            # rewrites examples/quickstart/model/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixcpt.config import SourceConfig, TemplateConfig
from mixcpt.data.readers import (
    alpaca_fields,
    domain_text,
    instruction_messages,
    preference_fields,
    read_records,
)
from mixcpt.data.render import render_messages, render_plain_prompt, render_plain_response
from mixcpt.demo.tokenizer import train_bpe_tokenizer

HERE = Path(__file__).resolve().parent
TEMPLATE = TemplateConfig()  # the default plain rendering, as examples/quickstart.yaml uses


def records(path: Path):
    return read_records(SourceConfig(path=str(path)))


def render_instruction(rec) -> str:
    """An Alpaca or chat sample as one plain document (the data stage's rendering)."""
    alpaca = alpaca_fields(rec)
    if alpaca:
        instruction, inp, output = alpaca
        return render_plain_prompt(instruction, inp, TEMPLATE) + render_plain_response(
            output, TEMPLATE
        )
    return "".join(render_messages(instruction_messages(rec), TEMPLATE))


def render_preference(rec) -> str:
    """A preference pair as one plain document with its chosen response."""
    prompt, chosen, _ = preference_fields(rec)
    return "".join(render_messages([*prompt, {"role": "assistant", "content": chosen}], TEMPLATE))


def general_documents() -> list[str]:
    """The base model's pretraining text: general knowledge only, no domain text."""
    docs = [domain_text(r, "text") for r in records(HERE / "pretrain" / "general.jsonl")]
    for name in ("pretrain/general_qa.jsonl", "data/instructions.jsonl"):
        docs += [render_instruction(r) for r in records(HERE / name)]
    docs += [render_instruction(r) for r in records(HERE / "data" / "instructions_chat.jsonl")]
    docs += [render_preference(r) for r in records(HERE / "data" / "preferences.jsonl")]
    return docs


def pack(docs: list[list[int]], eos: int, block: int, rng: random.Random):
    """One epoch: documents in a shuffled order, EOS-joined, cut into blocks; positions restart
    at each document, padding is masked out of the loss."""
    ids: list[int] = []
    pos: list[int] = []
    for doc in rng.sample(docs, len(docs)):
        ids += doc + [eos]
        pos += range(len(doc) + 1)
    pad = -len(ids) % block
    labels = ids + [-100] * pad
    ids, pos = ids + [eos] * pad, pos + list(range(pad))
    shape = (-1, block)
    return (
        torch.tensor(ids).view(shape),
        torch.tensor(pos).view(shape),
        torch.tensor(labels).view(shape),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "model", help="model folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args()
    start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    general = general_documents()
    domain = [domain_text(r, "text") for r in records(HERE / "data" / "domain")]
    tokenizer = train_bpe_tokenizer(general + domain, vocab_size=args.vocab_size)
    docs = tokenizer(general, add_special_tokens=True)["input_ids"]  # each starts with BOS
    # The general questions once more in the chat template (which starts with BOS itself), as a
    # real base model has seen chat-formatted text too: what the base knows stays measurable in
    # the chat format that the aligned stages are evaluated in.
    chats = [
        tokenizer.apply_chat_template(instruction_messages(r), tokenize=False)
        for r in records(HERE / "pretrain" / "general_qa.jsonl")
    ]
    docs += tokenizer(chats, add_special_tokens=False)["input_ids"]

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    block, batch_size, lr = 128, args.batch_size, args.lr
    rng = random.Random(args.seed)
    epochs = [pack(docs, tokenizer.eos_token_id, block, rng) for _ in range(args.epochs)]
    ids, pos, labels = (torch.cat(t) for t in zip(*epochs))
    steps = math.ceil(len(ids) / batch_size)
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    for step in range(steps):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        loss = model(input_ids=ids[sl], position_ids=pos[sl], labels=labels[sl]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}")

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.out.exists():
        shutil.rmtree(args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    # a quick look: a general question in the plain template the base was trained with
    prompt = render_plain_prompt("How many legs does a spider have?", "", TEMPLATE)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(
        json.dumps(
            {
                "out": str(args.out),
                "parameters": model.num_parameters(),
                "bytes": size,
                "documents": len(docs),
                "tokens_per_epoch": sum(len(d) + 1 for d in docs),
                "steps": steps,
                "final_loss": round(loss.item(), 4),
                "seconds": round(time.time() - start, 1),
                "spider_legs": answer,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
