"""The forward pass of stage 1's student and teacher over a packed batch (and of the response
scorer and the alignment losses over right-padded ones, `mixcpt.responses`).

Packed blocks hold several documents; position ids restart at each, and transformers then masks
attention block-diagonally (see `mixcpt.data.packing`). The vocabulary-wide loss wants the
model's final hidden states and output layer rather than its [B, T, V] logits, so that
`fused_loss.cpt_loss` can make the logits a chunk of positions at a time.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def packed_forward_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """The forward arguments of a packed batch: input ids and position ids, no attention mask
    (position ids restart per document, so transformers masks block-diagonally), and no KV cache,
    without which transformers skips that packed-sequence detection whatever `config.use_cache` says
    (with a cache, documents in a block would attend to each other)."""
    return {
        "input_ids": inputs["input_ids"],
        "position_ids": inputs["position_ids"],
        "use_cache": False,
    }


class LossForward:
    """Runs a causal LM on a packed batch for a vocabulary-wide loss, from its final hidden states
    when that is exact, so its [B, T, V] logits are never made.

    `model` is what the forward goes through (for the student, the DDP-wrapped module, so gradients
    sync); `unwrapped` is the bare model. The hidden path is taken when its output layer is a
    bias-free `nn.Linear` with no softcap, and is checked on the first batch: the model's own logits
    at the last position must be that layer applied to the captured hidden states (a scale after
    the output layer, or a model ignoring `logits_to_keep`, fails it). Otherwise, with
    `hidden=False` (FSDP/DeepSpeed ZeRO-3 shard the weight outside forward), or when the weight
    turns out to be an FSDP2 shard (a `DTensor`), logits are used.

    The final hidden states are taken from the decoder's output by a forward hook, not with
    `output_hidden_states=True`: that keeps every layer's output alive until the forward returns,
    which for a no-grad teacher is pure waste (8 x 4096 tokens through an 8B model: about 8.9 GB
    against 0.27 GB for the last layer).
    """

    def __init__(self, unwrapped: torch.nn.Module, hidden: bool = True):
        head = unwrapped.get_output_embeddings()
        plain = type(head) is torch.nn.Linear and head.bias is None
        softcap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
        decoder = _decoder(unwrapped)
        self.head = head if hidden and plain and not softcap and decoder is not None else None
        self.decoder = decoder
        self.checked = False

    def __call__(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        forward_inputs: dict | None = None,
    ):
        """Returns (rows, output weight or None, model outputs): rows are hidden states [B, T, H]
        with the weight [V, H], or logits [B, T, V] with None. The forward's arguments are those of
        a packed batch (`packed_forward_inputs`), or `forward_inputs` (e.g. a right-padded batch,
        `responses.padded_forward_inputs`)."""
        batch = packed_forward_inputs(inputs) if forward_inputs is None else forward_inputs
        if self.head is not None and isinstance(self.head.weight, DTensor):
            # sharded by FSDP2: outside forward this process holds only its rows of the weight
            self.head = None
        if self.head is not None:
            captured = []
            hook = self.decoder.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
            try:
                outputs = model(**batch, logits_to_keep=1)
            finally:
                hook.remove()
            hidden = captured[-1]  # [B, T, H] the decoder's output, the output layer's input
            if self.checked or self._exact(hidden, outputs.logits):
                self.checked = True
                return hidden, self.head.weight, outputs
            self.head = None
        outputs = model(**batch)
        return outputs.logits, None, outputs

    def _exact(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        with torch.no_grad():
            # the hidden states of an autocast forward come out float32, while a frozen head
            # (a LoRA base) is stored in model.dtype
            mine = self.head(hidden[:, -1:].to(self.head.weight.dtype)).float()  # [B, 1, V]
        logits = logits.float()
        # loose enough for bf16 autocast, tight enough for any real scale of the logits
        return mine.shape == logits.shape and torch.allclose(
            mine, logits, rtol=1e-2, atol=1e-2 * logits.abs().max().item()
        )


def _decoder(unwrapped: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output (first item: `last_hidden_state`) feeds the output layer: the
    decoder stack of a causal LM (also through a PEFT wrapper), or None when the model names none
    (transformers' `get_decoder` then returns the model itself)."""
    try:
        decoder = unwrapped.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    model = getattr(unwrapped, "get_base_model", lambda: unwrapped)()
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None
