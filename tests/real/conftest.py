"""A tiny GGUF file written from the tiny Llama and tiny tokenizer the way llama.cpp's converter
writes one, so GGUF loading is tested without the 93 MB SmolLM2 package."""

from __future__ import annotations

import json

import pytest
import torch

# transformers' Llama module name -> llama.cpp's tensor name inside block N
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its rotary kernel (convert_hf_to_gguf.py's
    permute); transformers undoes this when it loads a GGUF."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model, tiny_tokenizer):
    """(path of a float32 GGUF holding `tiny_model` and `tiny_tokenizer`, the model)."""
    gguf = pytest.importorskip("gguf")
    cfg = tiny_model.config
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = tiny_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tiny_tokenizer.all_special_tokens)
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tiny_tokenizer.bos_token_id)
    writer.add_eos_token_id(tiny_tokenizer.eos_token_id)
    writer.add_pad_token_id(tiny_tokenizer.pad_token_id)
    writer.add_chat_template(tiny_tokenizer.chat_template)

    for name, tensor in tiny_model.state_dict().items():
        w = tensor.float()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:  # model.layers.N.<module>.weight
            _, _, layer, module = name.removesuffix(".weight").split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tiny_model
