"""The stage-1 forward: a no-grad teacher keeps only the final hidden states, whatever its depth."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM

from mixcpt.train.forward import LossForward
from mixcpt.train.teachers import OnlineTeacher

B, T, H, V = 2, 32, 64, 300


class PeakLiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage created inside the mode that were alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors using it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def teacher_peak_bytes(model: LlamaForCausalLM) -> int:
    """Peak live bytes of one online-teacher target of `model`, past the weights."""
    teacher = OnlineTeacher(model, V)
    inputs = {
        "input_ids": torch.randint(3, V, (B, T)),
        "position_ids": torch.arange(T).repeat(B, 1),
    }
    teacher.target(inputs)  # the first batch checks the hidden path against the logits
    assert teacher.forward.checked  # and takes it: the peak below is the hidden path's
    with PeakLiveBytes() as mode:
        target = teacher.target(inputs)
    del target
    return mode.peak


def test_the_teacher_forward_keeps_no_per_layer_hidden_states(make_tiny_llama):
    """An 8B teacher's 33 layer outputs at 8 x 4096 tokens are 8.9 GB: a teacher 4x deeper must
    not hold more at its peak than one layer's hidden states more (today's bar: none)."""
    one_layer_states = B * T * H * 4
    shallow, deep = (
        teacher_peak_bytes(make_tiny_llama(V, hidden=H, layers=layers)) for layers in (2, 8)
    )
    assert deep - shallow < one_layer_states, (shallow, deep)


def test_the_captured_hidden_states_give_the_models_logits(make_tiny_llama):
    model = make_tiny_llama(V, hidden=H)
    inputs = {
        "input_ids": torch.randint(3, V, (B, T)),
        "position_ids": torch.arange(T).repeat(B, 1),
    }
    forward = LossForward(model)
    with torch.no_grad():
        rows, weight, _ = forward(model, inputs)
        logits = model(**inputs).logits
    assert weight is not None and forward.checked  # the hidden-state path was taken
    torch.testing.assert_close(rows @ weight.T, logits, atol=1e-5, rtol=1e-5)


def test_zero_1_and_2_keep_the_memory_flat_path(monkeypatch):
    """Only FSDP and ZeRO-3 shard the output layer's weight outside forward; under DDP and
    DeepSpeed ZeRO-1/2 every process holds it whole, so the student's loss must not fall back to
    [B, T, V] logits there."""
    from types import SimpleNamespace

    import mixcpt.train.trainer as trainer_module

    for fsdp, zero3, shards in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda z=zero3: z)
        trainer = SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=True)
        assert trainer_module.shards_parameters(trainer) is shards
