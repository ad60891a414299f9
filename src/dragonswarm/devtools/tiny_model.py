"""Write tiny random-weight GGUF models for tests and benchmarks.

A llama-architecture model with a byte-level SPM vocabulary: the real llama.cpp engine
loads it and generates thousands of tokens per second on one thread, so tests exercise
the whole stack without waiting on a real model. Its output is noise, but deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Jinja chat template stored in the model so chat requests use "the model's own template".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The same, teaching tool calls the way Qwen's and Hermes' templates do.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>You may call these tools: {{ tools | tojson }}. Answer a call as "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FIM_TOKENS = (b"<|fim_prefix|>", b"<|fim_suffix|>", b"<|fim_middle|>")


def write_tiny_model(
    path: Path,
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 4096,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    fim: bool = False,
) -> Path:
    """Write a random-weight llama GGUF to `path` and return it; with `fim`, it has
    fill-in-the-middle tokens (appended after the byte tokens)."""
    import gguf  # test-only dependency, imported where it is used

    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    tokens += [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    if fim:
        tokens += FIM_TOKENS
        types += [gguf.TokenType.CONTROL] * len(FIM_TOKENS)
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(chat_template)
    if fim:
        for key, token_id in zip((gguf.Keys.Tokenizer.FIM_PRE_ID, gguf.Keys.Tokenizer.FIM_SUF_ID,
                                  gguf.Keys.Tokenizer.FIM_MID_ID), range(259, 262), strict=True):  # fmt: skip
            writer.add_uint32(key, token_id)

    def tensor(name: str, *shape: int) -> None:
        data = rng.standard_normal(shape).astype(np.float32) * 0.5
        writer.add_tensor(name, data)

    tensor("token_embd.weight", n_vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # Zero rows for <unk>, <s>, </s>: their logits stay at 0 while the others spread
    # widely, so the model practically never ends early and long generations are long.
    output = rng.standard_normal((n_vocab, n_embd)).astype(np.float32) * 0.5
    output[:3] = 0.0
    writer.add_tensor("output.weight", output)
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_k.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_v.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
