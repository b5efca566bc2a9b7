"""Teacher sources (design §6): online copy, LoRA-disabled student, and the on-disk top-k cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from mixcpt.data.packing import IndexedBlocks, write_packed
from mixcpt.errors import ConfigError
from mixcpt.losses import next_token_labels
from mixcpt.models import load_model
from mixcpt.train import teacher_cache
from mixcpt.train.forward import LossForward
from mixcpt.train.fused_loss import cpt_loss, lssd_loss_topk
from mixcpt.train.teacher_cache import CachedTeacher, build_teacher_cache, top_k_logprobs
from mixcpt.train.teachers import LoraTeacher, OnlineTeacher

V, BLOCK = 400, 16


def write_blocks(folder, seed, fingerprint, n_blocks=5):
    """Random token blocks, two documents per block (position ids restart in the middle)."""
    g = np.random.default_rng(seed)
    ids = g.integers(3, V, size=(n_blocks, BLOCK))
    positions = np.tile(np.r_[np.arange(BLOCK // 2), np.arange(BLOCK - BLOCK // 2)], (n_blocks, 1))
    write_packed(
        folder,
        ids,
        positions,
        n_tokens=n_blocks * BLOCK - 3,
        pad_token_id=0,
        fingerprint=fingerprint,
    )
    return IndexedBlocks(folder)


@pytest.fixture
def blocks(tmp_path):
    return write_blocks(tmp_path / "mix", seed=0, fingerprint="mix-a")


@pytest.fixture
def teacher_model(make_tiny_llama):
    return make_tiny_llama(V, seed=1)


def batch_of(blocks, rows):
    return {k: torch.stack([torch.as_tensor(blocks[i][k]) for i in rows]) for k in blocks[0]}


def student_logits_and_labels(batch, seed=7):
    labels = next_token_labels(batch["labels"])  # [B, T]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*labels.shape, V, generator=g) * 2, labels


def teacher_lssd(teacher, batch, student, labels, temperature, chunk_size, objective="lssd"):
    """(the objective's distillation term, teacher top-1 matches) of the teacher's target for the
    batch."""
    result = cpt_loss(
        student,
        labels,
        teacher.target(batch),
        ce_weight=0.0,
        temperature=temperature,
        chunk_size=chunk_size,
        objective=objective,
    )
    return result.loss, result.teacher_top1_matches


def target_logits(target):
    """The teacher logits [B, T, V] a full-distribution target stands for."""
    return target.rows if target.output_weight is None else target.rows @ target.output_weight.T


@pytest.mark.parametrize("objective", ["lssd", "kl", "mft"])
def test_cache_with_k_equal_to_vocab_gives_the_online_loss(
    blocks, teacher_model, tmp_path, objective
):
    cache = build_teacher_cache(
        teacher_model,
        blocks,
        tmp_path / "cache",
        top_k=V,
        temperature=2.0,
        batch_size=2,
        dtype="float32",
    )
    online = OnlineTeacher(teacher_model, V)
    batch = batch_of(blocks, [4, 1, 3])  # block 4 has padding (ignored labels)
    student, labels = student_logits_and_labels(batch)
    exact, exact_top1 = teacher_lssd(online, batch, student, labels, 2.0, 7, objective)
    cached, cached_top1 = teacher_lssd(cache, batch, student, labels, 2.0, 7, objective)
    assert cached.item() == pytest.approx(exact.item(), abs=1e-5)
    assert cached_top1 == exact_top1


def test_cache_with_small_k_stores_fp16_top_k_and_gives_the_bucketed_loss(
    blocks, teacher_model, tmp_path
):
    k = 8
    cache = build_teacher_cache(
        teacher_model, blocks, tmp_path / "cache", top_k=k, temperature=1.0, batch_size=2
    )
    assert cache.logprobs.dtype == np.float16 and cache.ids.dtype == np.int32
    assert cache.bytes_per_token == k * (2 + 4) + 4

    batch = batch_of(blocks, [0, 4])
    with torch.no_grad():
        log_q = teacher_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).logits
        log_q = log_q.log_softmax(-1)
    values, ids = log_q.topk(k, -1)
    tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    student, labels = student_logits_and_labels(batch)
    expected = lssd_loss_topk(student, ids, values, tail, labels)
    got, _ = teacher_lssd(cache, batch, student, labels, temperature=1.0, chunk_size=64)
    assert got.item() == pytest.approx(expected.item(), rel=2e-3)  # fp16 storage of the log-probs


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_cache_top_k_from_hidden_states_in_chunks_equals_the_full_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden, weight = (
        torch.randn(20, 8, generator=g),
        torch.randn(V, 8, generator=g) * 3,
    )  # peaked: tiny tails
    log_q = (hidden.double() @ weight.double().T / 0.5).log_softmax(-1)  # [20, V] in float64
    values, ids, tail = top_k_logprobs(hidden, weight, 5, temperature=0.5, chunk_size=chunk_size)
    expected_values, expected_ids = log_q.topk(5, dim=-1)
    torch.testing.assert_close(values.double(), expected_values, atol=1e-4, rtol=0)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(
        tail.double(),
        log_q.scatter(-1, expected_ids, float("-inf")).logsumexp(-1),
        atol=1e-3,
        rtol=1e-4,
    )
    _, _, no_tail = top_k_logprobs(hidden, weight, V, temperature=0.5, chunk_size=chunk_size)
    assert torch.isneginf(no_tail).all()


def test_cache_building_resumes_where_it_stopped(blocks, teacher_model, tmp_path):
    folder = tmp_path / "cache"
    full = build_teacher_cache(
        teacher_model, blocks, folder, top_k=4, temperature=1.0, batch_size=2
    )
    expected = np.array(full.logprobs)
    del full
    # As if killed after the first batch: later rows were never written; earlier rows are kept.
    logprobs = np.load(folder / "logprobs.npy", mmap_mode="r+")
    logprobs[:] = 0
    logprobs.flush()
    done = np.load(folder / "done.npy", mmap_mode="r+")
    done[2:] = 0
    done.flush()

    resumed = build_teacher_cache(
        teacher_model, blocks, folder, top_k=4, temperature=1.0, batch_size=2
    )
    assert np.all(resumed.logprobs[:2] == 0)  # not recomputed
    np.testing.assert_array_equal(resumed.logprobs[2:], expected[2:])


@pytest.mark.parametrize("sync_seconds,marked", [(0.0, [0, 2, 4]), (1e9, [0, 0, 0])])
def test_cache_progress_is_marked_every_sync_interval_and_at_the_end(
    blocks, teacher_model, tmp_path, monkeypatch, sync_seconds, marked
):
    """The maps are synced and their blocks marked in done.npy at most every SYNC_SECONDS (a sync
    waits on the disk) and always after the last batch, so a finished cache is complete on disk."""
    monkeypatch.setattr(teacher_cache, "SYNC_SECONDS", sync_seconds)
    folder, seen = tmp_path / "c", []
    compute = teacher_cache.teacher_top_k

    def spy(*args, **kwargs):  # the blocks marked done when each batch begins
        seen.append(int(np.load(folder / "done.npy").sum()))
        return compute(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "teacher_top_k", spy)
    build_teacher_cache(teacher_model, blocks, folder, top_k=4, temperature=1.0, batch_size=2)
    assert seen == marked  # 5 blocks: batches of 2, 2 and 1
    assert np.load(folder / "done.npy").all()


def test_a_partial_cache_from_before_done_npy_resumes_from_its_progress(
    blocks, teacher_model, tmp_path
):
    folder = tmp_path / "cache"
    expected = np.array(
        build_teacher_cache(teacher_model, blocks, folder, 4, 1.0, batch_size=2).logprobs
    )
    logprobs = np.load(folder / "logprobs.npy", mmap_mode="r+")
    logprobs[:] = 0
    logprobs.flush()
    (folder / "done.npy").unlink()  # as an older mixcpt left it: a prefix in progress.json
    (folder / "progress.json").write_text(json.dumps({"blocks_done": 2}))

    resumed = build_teacher_cache(teacher_model, blocks, folder, 4, 1.0, batch_size=2)
    assert np.all(resumed.logprobs[:2] == 0)  # kept as done
    np.testing.assert_array_equal(resumed.logprobs[2:], expected[2:])


def test_a_cache_from_other_data_or_another_teacher_is_refused(
    blocks, teacher_model, tmp_path, make_tiny_llama
):
    folder = tmp_path / "cache"
    build_teacher_cache(teacher_model, blocks, folder, top_k=4, temperature=1.0)
    other_data = write_blocks(tmp_path / "other", seed=1, fingerprint="mix-b")
    with pytest.raises(
        ConfigError, match="fingerprint: cache 'mix-a' vs now 'mix-b'.*Delete the folder"
    ):
        build_teacher_cache(teacher_model, other_data, folder, top_k=4, temperature=1.0)
    with pytest.raises(ConfigError, match="teacher_hash"):
        build_teacher_cache(make_tiny_llama(V, seed=2), blocks, folder, top_k=4, temperature=1.0)
    with pytest.raises(ConfigError, match="fingerprint"):
        CachedTeacher(folder, "mix-b", V, temperature=1.0)


def test_a_teacher_with_another_vocabulary_is_refused(
    blocks, teacher_model, tmp_path, make_tiny_llama
):
    with pytest.raises(ConfigError, match="vocabulary has 500 tokens, the student's 400"):
        OnlineTeacher(make_tiny_llama(500), student_vocab_size=V)
    build_teacher_cache(teacher_model, blocks, tmp_path / "cache", top_k=4, temperature=1.0)
    with pytest.raises(ConfigError, match="vocabulary has 400 tokens, the student's 512"):
        CachedTeacher(tmp_path / "cache", "mix-a", 512, temperature=1.0)


def test_online_teacher_is_a_frozen_independent_copy(teacher_model):
    teacher = OnlineTeacher(teacher_model, V)
    assert teacher.model is not teacher_model and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    with torch.no_grad():
        teacher_model.lm_head.weight.add_(1.0)  # the student trains; the teacher must not move
    assert not torch.equal(teacher.model.lm_head.weight, teacher_model.lm_head.weight)


def test_online_teacher_of_a_float32_student_is_stored_in_model_dtype(
    blocks, teacher_model, tmp_path
):
    teacher = OnlineTeacher(teacher_model, V, torch.bfloat16)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher_model.parameters()} == {torch.float32}  # the student
    teacher_model.save_pretrained(tmp_path / "base")
    as_loaded = load_model(tmp_path / "base", "bfloat16")  # what the base loaded in bf16 gives
    batch = batch_of(blocks, [0, 1])
    with torch.no_grad():
        logits = as_loaded(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert torch.equal(target_logits(teacher.target(batch)), logits)


def test_lora_teacher_is_the_base_model_without_a_second_copy(blocks, teacher_model):
    batch = batch_of(blocks, [0, 1])
    with torch.no_grad():
        base_logits = teacher_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).logits
    n_params = sum(p.numel() for p in teacher_model.parameters())
    student = get_peft_model(
        teacher_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():  # adapters that have learned something
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    teacher = LoraTeacher(student)
    assert (
        sum(p.numel() for p in student.parameters()) < 1.5 * n_params
    )  # adapters only, no base copy
    torch.testing.assert_close(target_logits(teacher.target(batch)), base_logits)
    with torch.no_grad():
        adapted = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert not torch.allclose(
        adapted, base_logits, atol=1e-3
    )  # the adapters are back on after the teacher ran
    assert all(
        p.requires_grad for name, p in student.named_parameters() if "lora_" in name
    )  # and still trained


def test_online_teacher_logits_come_from_its_hidden_states_and_equal_the_models(
    blocks, teacher_model
):
    batch = batch_of(blocks, [0, 2])
    target = OnlineTeacher(teacher_model, V).target(batch)
    assert target.rows.shape == (
        2,
        BLOCK,
        teacher_model.config.hidden_size,
    )  # no [B, T, V] tensor was made
    with torch.no_grad():
        logits = teacher_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).logits
    torch.testing.assert_close(target_logits(target), logits, atol=1e-5, rtol=1e-5)


class ScaledLlama(LlamaForCausalLM):
    """A model that changes its logits after the output layer (as logit scales and softcaps do)."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 3
        return outputs


def test_teachers_keep_packed_documents_apart_even_when_the_config_enables_the_kv_cache(
    blocks, teacher_model
):
    """A model straight from from_pretrained has use_cache=True, with which transformers would let
    the documents of a packed block attend to each other; the teachers' forward turns the cache
    off."""
    teacher_model.config.use_cache = True
    block = batch_of(blocks, [0])
    start = int((block["position_ids"][0, 1:] == 0).nonzero()[0]) + 1  # the second document
    target = OnlineTeacher(teacher_model, V).target(block)
    with torch.no_grad():
        alone = teacher_model(input_ids=block["input_ids"][:, start:], use_cache=False).logits
    torch.testing.assert_close(target_logits(target)[:, start:], alone, atol=1e-5, rtol=1e-5)


def test_loss_forward_falls_back_to_logits_when_something_follows_the_output_layer(
    blocks, teacher_model
):
    batch = batch_of(blocks, [0, 1])
    scaled = ScaledLlama(teacher_model.config)
    scaled.load_state_dict(teacher_model.state_dict())
    forward = LossForward(scaled)
    with torch.no_grad():
        rows, weight, _ = forward(scaled, batch)
        again, _, _ = forward(scaled, batch)  # and keeps using logits
        expected = scaled(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert weight is None
    torch.testing.assert_close(rows, expected)
    torch.testing.assert_close(again, expected)
