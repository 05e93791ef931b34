"""Tiny random models in the Hugging Face layout users already have (config, tokenizer, safetensors).

Called by ``hydraserve model tiny`` (hydraserve.modeltools.commands), the test fixtures and the
demo. Weights come from transformers' own model classes (LlamaForCausalLM, Qwen2ForCausalLM,
OPTForCausalLM) with a fixed seed, so our runtime's model code can be checked against
transformers on exactly these files. Norm weights and biases are perturbed after init (HF
initialises them to 1 and 0, which would leave bugs in their handling invisible).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on corpus.txt (bundled
public-domain-style text), so tokenizer.json is real and decodes any byte sequence.
transformers is a test-only dependency: it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 300  # 256 byte symbols + specials + a few merges

# Rendered with (messages, add_generation_prompt, bos_token, eos_token). OPT models get none,
# so servers fall back to their default template.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Arch = Literal["llama", "opt"]


@dataclass(frozen=True)
class TinySpec:
    """Sizes and options of a tiny model; defaults give a ~0.2 MB 2-layer model."""

    arch: Arch = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None  # None: same as heads (MHA)
    vocab: int = 512
    intermediate: int | None = None  # None: 2 x hidden
    dtype: str = "float32"
    shard_size: str | None = None  # e.g. "200KB": sharded safetensors + index
    seed: int = 0
    max_position: int = 512
    init_std: float = 0.02
    # llama family
    tie_embeddings: bool = False
    rope_scaling: str | None = None  # "llama3"
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # True: Qwen2 architecture
    # OPT
    post_ln: bool = False  # do_layer_norm_before=False (OPT-350m style)
    word_embed_proj_dim: int | None = None


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE over the bundled corpus; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (Path(__file__).with_name("corpus.txt")).read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.split("\n\n"), trainer=trainer)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    return tok


def _hf_config(spec: TinySpec) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_position,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=spec.tie_embeddings,
    )
    if spec.arch == "opt":
        return transformers.OPTConfig(
            ffn_dim=spec.intermediate or 2 * spec.hidden,
            do_layer_norm_before=not spec.post_ln,
            word_embed_proj_dim=spec.word_embed_proj_dim or spec.hidden,
            init_std=spec.init_std,
            dropout=0.0,
            **{**common, "tie_word_embeddings": True},  # OPT always ties its head
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": max(16, spec.max_position // 8)}
    elif spec.rope_scaling is not None:
        raise ValueError(f"unsupported rope scaling {spec.rope_scaling!r} (only 'llama3')")
    llama_like: dict[str, Any] = dict(
        intermediate_size=spec.intermediate or 2 * spec.hidden,
        num_key_value_heads=spec.kv_heads or spec.heads,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-6,
        **common,
    )
    cls = transformers.Qwen2Config if spec.qkv_bias else transformers.LlamaConfig
    config = cls(**llama_like)
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x reads rope_theta/rope_scaling.
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = rope
    else:
        config.rope_theta = spec.rope_theta
        config.rope_scaling = rope if spec.rope_scaling else None
    return config


def _hf_model_class(spec: TinySpec) -> Any:
    import transformers

    if spec.arch == "opt":
        return transformers.OPTForCausalLM
    return transformers.Qwen2ForCausalLM if spec.qkv_bias else transformers.LlamaForCausalLM


def make_tiny_model(out_dir: str | Path, spec: TinySpec) -> Path:
    """Write config.json, tokenizer files and safetensors weights for ``spec`` into ``out_dir``."""
    import torch

    if spec.vocab < MIN_VOCAB:
        raise ValueError(f"--vocab must be >= {MIN_VOCAB} (byte-level BPE needs 256 + specials)")
    if spec.hidden % spec.heads:
        raise ValueError(f"hidden {spec.hidden} is not a multiple of heads {spec.heads}")
    if spec.kv_heads and spec.heads % spec.kv_heads:
        raise ValueError(f"heads {spec.heads} is not a multiple of kv heads {spec.kv_heads}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = _hf_config(spec)
    torch.manual_seed(spec.seed)
    model = _hf_model_class(spec)(config)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "norm" in name:  # RMSNorm / LayerNorm weights, HF inits them to 1
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)
    model = model.to(dtype).eval()
    save_kwargs: dict[str, Any] = {}
    if spec.shard_size:
        save_kwargs["max_shard_size"] = spec.shard_size
    model.save_pretrained(str(out), **save_kwargs)

    tok = train_tokenizer(spec.vocab)
    tok.save(str(out / "tokenizer.json"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "model_max_length": spec.max_position,
        "clean_up_tokenization_spaces": False,
    }
    if spec.arch == "llama":
        tok_config["chat_template"] = LLAMA_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2) + "\n")
    return out
