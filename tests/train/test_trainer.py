"""LSSDTrainer: the stage-1 loss inside transformers.Trainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mixcpt.config import TrainingConfig
from mixcpt.data.packing import IndexedBlocks, write_packed
from mixcpt.errors import ConfigError
from mixcpt.losses import lssd_loss
from mixcpt.train.arguments import training_arguments
from mixcpt.train.targets import TeacherRows
from mixcpt.train.teachers import OnlineTeacher, Teacher
from mixcpt.train.trainer import LSSDTrainer, NonFiniteLossError

from .conftest import DOMAIN, HELD_OUT, pack


@pytest.fixture
def domain_blocks(tmp_path, tiny_tokenizer):
    pack(tiny_tokenizer, DOMAIN, tmp_path / "domain", "domain-v1")
    return IndexedBlocks(tmp_path / "domain")


def make_trainer(model, blocks, tmp_path, max_steps=4, learning_rate=3e-3, **loss):
    tc = TrainingConfig(
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_batch_size=4,
        logging_steps=2,
        save_steps=1000,
        lr_scheduler="constant",
    )
    args = training_arguments(tc, tmp_path / "out", seed=0, remove_unused_columns=False)
    return LSSDTrainer(model=model, args=args, train_dataset=blocks, loss_chunk_size=16, **loss)


def train_copy(base, blocks, tmp_path, **loss):
    model = copy.deepcopy(base).train()
    trainer = make_trainer(model, blocks, tmp_path, **loss)
    trainer.train()
    return model.eval(), trainer


def mean_ce(model, blocks):
    batch = {
        k: torch.stack([blocks[i][k] for i in range(len(blocks))])
        for k in ("input_ids", "position_ids")
    }
    labels = torch.stack([blocks[i]["labels"] for i in range(len(blocks))])
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def kl_from(original, model, tokenizer, texts):
    """Mean over positions of KL(original || model) on `texts`."""
    ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    with torch.no_grad():
        kls = [
            torch.nn.functional.kl_div(
                model(x).logits.log_softmax(-1),
                original(x).logits.log_softmax(-1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)
            .mean()
            for x in ids
        ]
    return torch.stack(kls).mean().item()


def test_a_few_lssd_steps_lower_the_training_loss_and_log_both_terms(
    tiny_model, domain_blocks, tmp_path
):
    before = mean_ce(tiny_model, domain_blocks)
    model, trainer = train_copy(
        tiny_model,
        domain_blocks,
        tmp_path,
        max_steps=6,
        teacher=OnlineTeacher(tiny_model, tiny_model.config.vocab_size),
    )
    assert mean_ce(model, domain_blocks) < before - 0.1
    logged = [h for h in trainer.state.log_history if "lssd_loss" in h]
    assert len(logged) == 3
    assert all(
        h["ce_loss"] > 0 and h["lssd_loss"] >= 0 and 0 <= h["teacher_top1_match"] <= 1
        for h in logged
    )


def test_lssd_keeps_the_model_closer_to_the_original_on_held_out_general_text(
    tiny_model, tiny_tokenizer, domain_blocks, tmp_path
):
    with (
        torch.no_grad()
    ):  # an opinionated original model, as a pretrained one is (a random init is near uniform)
        tiny_model.lm_head.weight.mul_(10)
    teacher = OnlineTeacher(tiny_model, tiny_model.config.vocab_size)
    plain, _ = train_copy(tiny_model, domain_blocks, tmp_path / "ce", max_steps=8, lssd_weight=0.0)
    lssd, _ = train_copy(
        tiny_model, domain_blocks, tmp_path / "lssd", max_steps=8, lssd_weight=1.0, teacher=teacher
    )
    kl_plain = kl_from(tiny_model, plain, tiny_tokenizer, HELD_OUT)
    kl_lssd = kl_from(tiny_model, lssd, tiny_tokenizer, HELD_OUT)
    assert kl_lssd < 0.8 * kl_plain


def test_the_online_teacher_is_a_frozen_copy(tiny_model, domain_blocks, tmp_path):
    teacher = OnlineTeacher(tiny_model, tiny_model.config.vocab_size)
    original = copy.deepcopy(teacher.model.state_dict())
    train_copy(tiny_model, domain_blocks, tmp_path, max_steps=2, teacher=teacher)
    assert (
        all(not p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    )
    assert all(torch.equal(v, original[k]) for k, v in teacher.model.state_dict().items())


@pytest.mark.parametrize(
    "use_cache", [False, True]
)  # with a KV cache transformers would not mask packed documents
def test_packed_documents_do_not_attend_to_each_other(
    tiny_model, tiny_tokenizer, domain_blocks, tmp_path, use_cache
):
    """compute_loss passes position ids and no attention mask: a document's logits inside a packed
    block are those of the document alone, whatever the model's config says about its KV cache."""
    trainer = make_trainer(tiny_model, domain_blocks, tmp_path, lssd_weight=0.0)
    tiny_model.config.use_cache = (
        use_cache  # after the Trainer, which sets it from TrainingArguments.use_cache
    )
    # a block in which a document starts after position 0 (the one before it fills the start)
    block = next(
        b
        for b in (domain_blocks[i] for i in range(len(domain_blocks)))
        if (b["position_ids"][1:] == 0).any()
    )
    block = {k: v[None] for k, v in block.items() if k != "block_index"}
    start = int((block["position_ids"][0, 1:] == 0).nonzero()[0]) + 1
    with torch.no_grad():
        _, outputs = trainer.compute_loss(tiny_model, block, return_outputs=True)
        alone = tiny_model(input_ids=block["input_ids"][:, start:]).logits
        student, weight, _ = trainer.student_forward(
            tiny_model, block
        )  # the path training takes: hidden states
    torch.testing.assert_close(outputs.logits[:, start:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student[:, start:] @ weight.T, alone, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_weighs_every_supervised_position_equally(tiny_model, tmp_path):
    """Two micro-batches of 2 blocks (gradient accumulation) train exactly as one batch of 4, even
    when a block is mostly padding: the loss is normalised by the supervised positions of the whole
    step, not averaged per micro-batch."""
    V = tiny_model.config.vocab_size
    ids = np.random.default_rng(0).integers(3, V, size=(8, 16))
    write_packed(
        tmp_path / "mix",
        ids,
        np.tile(np.arange(16), (8, 1)),
        n_tokens=7 * 16 + 3,
        pad_token_id=0,
        fingerprint="ga",
    )  # the last block: 3 tokens, then padding
    blocks = IndexedBlocks(tmp_path / "mix")

    def train(batch_size, accumulation):
        model = copy.deepcopy(tiny_model).train()
        tc = TrainingConfig(
            learning_rate=0.5,
            max_steps=2,
            per_device_batch_size=batch_size,  # 2 steps: all 8 blocks
            gradient_accumulation_steps=accumulation,
            lr_scheduler="constant",
            save_steps=1000,
        )
        # SGD, so the weights show the gradients themselves: Adam's first steps divide each gradient
        # by its own size, which turns float rounding in near-zero entries into visible differences.
        args = training_arguments(
            tc, tmp_path / f"out-{batch_size}", seed=0, remove_unused_columns=False, optim="sgd"
        )
        LSSDTrainer(
            model=model,
            args=args,
            train_dataset=blocks,
            teacher=OnlineTeacher(tiny_model, V),
            loss_chunk_size=16,
        ).train()
        return model

    whole, accumulated = train(4, 1), train(2, 2)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


class NaNTeacher(Teacher):
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def target(self, inputs):
        B, T = inputs["input_ids"].shape
        return TeacherRows(torch.full((B, T, self.vocab_size), float("nan")))


def test_a_non_finite_loss_stops_with_a_clear_error(tiny_model, domain_blocks, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0.*on_nonfinite: skip"):
        train_copy(
            tiny_model, domain_blocks, tmp_path, teacher=NaNTeacher(tiny_model.config.vocab_size)
        )


def test_skip_gives_a_non_finite_batch_no_update(tiny_model, domain_blocks, tmp_path):
    model, trainer = train_copy(
        tiny_model,
        domain_blocks,
        tmp_path,
        max_steps=2,
        teacher=NaNTeacher(tiny_model.config.vocab_size),
        on_nonfinite="skip",
    )
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert any(h.get("skipped_batches") == 2 for h in trainer.state.log_history)


def test_both_weights_zero_or_lssd_without_teacher_are_refused(tiny_model, domain_blocks, tmp_path):
    with pytest.raises(ConfigError, match="both 0"):
        make_trainer(tiny_model, domain_blocks, tmp_path, ce_weight=0.0, lssd_weight=0.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        make_trainer(tiny_model, domain_blocks, tmp_path, lssd_weight=1.0)


def test_the_loss_from_hidden_states_equals_ce_plus_lssd_on_full_logits_in_value_and_gradient(
    tiny_model, domain_blocks, tmp_path
):
    """compute_loss never makes the student's [B, T, V] logits, yet gives what the paper's formula
    on full logits gives (with HF's own shifted cross-entropy as the CE)."""
    teacher = OnlineTeacher(tiny_model, tiny_model.config.vocab_size)
    model = copy.deepcopy(tiny_model).train()
    trainer = make_trainer(
        model,
        domain_blocks,
        tmp_path,
        ce_weight=0.5,
        lssd_weight=2.0,
        temperature=1.5,
        teacher=teacher,
    )
    batch = {
        k: torch.stack([torch.as_tensor(domain_blocks[i][k]) for i in range(3)])
        for k in domain_blocks[0]
    }
    loss = trainer.compute_loss(model, batch)
    assert trainer.student_forward.head is not None  # the hidden-state path was taken
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    outputs = model(**inputs, labels=batch["labels"])
    with torch.no_grad():
        teacher_logits = tiny_model(**inputs).logits
    lssd = lssd_loss(
        outputs.logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], temperature=1.5
    )
    expected = 0.5 * outputs.loss + 2.0 * lssd
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4)


def test_the_loss_of_a_two_document_block_leaves_out_the_first_documents_eos(tiny_model, tmp_path):
    """CE and LSSD over a block of two packed documents equal the mean over the positions inside
    each document, computed on each document alone: the EOS of the first is no target."""
    V = tiny_model.config.vocab_size
    g = np.random.default_rng(3)
    a, b = [1, *g.integers(3, V, 6), 2], [1, *g.integers(3, V, 8), 2]  # 8 + 10 tokens
    write_packed(
        tmp_path / "two",
        np.array([a + b]),
        np.array([[*range(len(a)), *range(len(b))]]),
        n_tokens=len(a) + len(b),
        pad_token_id=0,
        fingerprint="two",
    )
    blocks = IndexedBlocks(tmp_path / "two")
    teacher = OnlineTeacher(tiny_model, V)
    trainer = make_trainer(
        tiny_model, blocks, tmp_path, ce_weight=0.5, lssd_weight=1.0, teacher=teacher
    )
    batch = {k: torch.as_tensor(v)[None] for k, v in blocks[0].items()}
    with torch.no_grad():
        loss = trainer.compute_loss(tiny_model, batch)

        # by hand: each document alone, its position t predicting its token t + 1
        nll, kl = [], []
        for doc in (a, b):
            ids = torch.tensor([doc])
            logits = tiny_model(input_ids=ids).logits[0, :-1]  # [n - 1, V]
            log_p = logits.log_softmax(-1)
            nll += (-log_p.gather(-1, ids[0, 1:, None])).flatten().tolist()
            # the swapped teacher (the same frozen model) as the LSSD target, per position
            for t, y in enumerate(doc[1:]):
                z = logits[t].clone()
                m = int(z.argmax())
                z[[y, m]] = z[[m, y]]
                log_q = z.log_softmax(-1)
                kl.append(float((log_q.exp() * (log_q - log_p[t])).sum()))
    assert len(nll) == len(a) + len(b) - 2  # the block's 17 positions minus A's EOS
    expected = 0.5 * np.mean(nll) + 1.0 * np.mean(kl)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
