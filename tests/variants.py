"""The model variants the engine is checked on against transformers (tests/runtime/test_model_parity.py);
the stage slicer's coverage test (tests/e2e/test_stage_slicer.py) slices the same ones."""

from __future__ import annotations

from hydraserve.modeltools.tiny import TinySpec

VARIANTS = {
    "llama_mha": TinySpec(arch="llama", heads=4),
    "llama_gqa": TinySpec(arch="llama", heads=4, kv_heads=2),
    "llama_mqa_4layers": TinySpec(arch="llama", layers=4, hidden=128, heads=8, kv_heads=1),
    "llama3_rope_scaling": TinySpec(arch="llama", heads=4, kv_heads=2, rope_scaling="llama3", rope_theta=500000.0),
    "llama_tied": TinySpec(arch="llama", tie_embeddings=True),
    "qwen2_qkv_bias": TinySpec(arch="qwen2", heads=4, kv_heads=2),
    "opt_pre_ln": TinySpec(arch="opt"),
    "opt_post_ln": TinySpec(arch="opt", post_ln=True),
    "opt_proj_dim": TinySpec(arch="opt", word_embed_proj_dim=32),
    "opt_post_ln_proj_dim": TinySpec(arch="opt", post_ln=True, word_embed_proj_dim=32),
    "llama_gqa_bf16": TinySpec(arch="llama", heads=4, kv_heads=2, dtype="bfloat16"),
    "qwen2_bf16": TinySpec(arch="qwen2", heads=4, kv_heads=2, dtype="bfloat16"),
    "opt_pre_ln_bf16": TinySpec(arch="opt", dtype="bfloat16"),
    "opt_post_ln_bf16": TinySpec(arch="opt", post_ln=True, word_embed_proj_dim=32, dtype="bfloat16"),
    "llama_gqa_fp16": TinySpec(arch="llama", heads=4, kv_heads=2, dtype="float16"),
    "opt_pre_ln_fp16": TinySpec(arch="opt", dtype="float16"),
}
