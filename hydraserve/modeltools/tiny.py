"""Tiny random models in the Hugging Face layout users already have (config, tokenizer, safetensors).

Called by ``hydraserve model tiny`` (hydraserve.cli.model), the test fixtures, the
benchmarks and the demo. One row of ARCHITECTURES per architecture a user would deploy (Llama,
Qwen2, Qwen3, Mistral, Gemma, Gemma 2, Phi-3, GPT-2, GPT-NeoX, OPT, Mixtral): its transformers
config class and how our few sizes map onto it. Weights come from transformers' own model
classes with a fixed seed, so serving engines can be checked against transformers on exactly
these files. Norm weights and biases are perturbed after init (HF initialises them to 1 and 0,
which would leave bugs in their handling invisible).

Defaults give head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention takes head sizes 32, 64,
80, ... only. The tokenizer is a byte-level BPE trained with the `tokenizers` library on
corpus.txt (bundled text), padded with added tokens up to the embedding's size, so every id a
random model emits decodes to some text. transformers is a test-only dependency: it is
imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 300  # 256 byte symbols + specials + a few merges

# Rendered with (messages, add_generation_prompt, bos_token, eos_token). Architectures without
# one (OPT, GPT-2, GPT-NeoX, as their checkpoints ship) make servers refuse chat or use theirs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes and options of a tiny model; defaults give a ~0.6 MB 2-layer Llama."""

    arch: str = "llama"  # a key of ARCHITECTURES
    layers: int = 2
    hidden: int = 64
    heads: int = 2
    kv_heads: int | None = None  # None: same as heads (MHA); GPT-2, GPT-NeoX and OPT have no GQA
    vocab: int = 512
    intermediate: int | None = None  # None: 2 x hidden
    dtype: str = "float32"
    shard_size: str | None = None  # e.g. "200KB": sharded safetensors + index
    seed: int = 0
    max_position: int = 512
    init_std: float = 0.02
    tie_embeddings: bool | None = None  # None: the architecture's usual choice
    rope_scaling: str | None = None  # "llama3" (Llama only)
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # Mistral, Qwen3, Gemma 2, Phi-3, Mixtral
    experts: int = 4  # Mixtral: local experts (2 per token)
    post_ln: bool = False  # OPT: do_layer_norm_before=False (OPT-350m style)
    word_embed_proj_dim: int | None = None  # OPT: embedding width

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Architecture:
    """How one architecture's transformers config is built from a TinySpec."""

    config_class: str
    build: Callable[[TinySpec], dict[str, Any]]  # the config's own keyword arguments
    tied: bool = False  # tie_word_embeddings when the spec does not say
    gqa: bool = True  # it has num_key_value_heads
    chat_template: bool = True
    sliding_window: bool = False
    rope: bool = True


def _llama_like(spec: TinySpec) -> dict[str, Any]:
    return dict(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                num_key_value_heads=spec.kv_heads or spec.heads, intermediate_size=_intermediate(spec),
                max_position_embeddings=spec.max_position, initializer_range=spec.init_std, rms_norm_eps=1e-6)


def _with_head_dim(spec: TinySpec) -> dict[str, Any]:
    return _llama_like(spec) | {"head_dim": spec.head_dim}


def _gemma2(spec: TinySpec) -> dict[str, Any]:
    return _with_head_dim(spec) | {"query_pre_attn_scalar": spec.head_dim, "sliding_window": spec.sliding_window or 4096,
                                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def _mixtral(spec: TinySpec) -> dict[str, Any]:
    return _with_head_dim(spec) | {"num_local_experts": spec.experts, "num_experts_per_tok": 2}


def _gpt2(spec: TinySpec) -> dict[str, Any]:
    return dict(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, n_inner=_intermediate(spec),
                n_positions=spec.max_position, initializer_range=spec.init_std, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0)


def _gpt_neox(spec: TinySpec) -> dict[str, Any]:
    return dict(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                intermediate_size=_intermediate(spec), max_position_embeddings=spec.max_position,
                initializer_range=spec.init_std, hidden_dropout=0.0, attention_dropout=0.0)


def _opt(spec: TinySpec) -> dict[str, Any]:
    return dict(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                ffn_dim=_intermediate(spec), max_position_embeddings=spec.max_position,
                do_layer_norm_before=not spec.post_ln, word_embed_proj_dim=spec.word_embed_proj_dim or spec.hidden,
                init_std=spec.init_std, dropout=0.0)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaConfig", _llama_like),
    "qwen2": Architecture("Qwen2Config", _llama_like, sliding_window=True),
    "qwen3": Architecture("Qwen3Config", _with_head_dim, sliding_window=True),
    "mistral": Architecture("MistralConfig", _with_head_dim, sliding_window=True),
    "gemma": Architecture("GemmaConfig", _with_head_dim, tied=True),
    "gemma2": Architecture("Gemma2Config", _gemma2, tied=True, sliding_window=True),
    "phi3": Architecture("Phi3Config", _llama_like, sliding_window=True),
    "gpt2": Architecture("GPT2Config", _gpt2, tied=True, gqa=False, chat_template=False, rope=False),
    "gpt_neox": Architecture("GPTNeoXConfig", _gpt_neox, gqa=False, chat_template=False),
    "opt": Architecture("OPTConfig", _opt, tied=True, gqa=False, chat_template=False, rope=False),
    "mixtral": Architecture("MixtralConfig", _mixtral, sliding_window=True),
}


def _intermediate(spec: TinySpec) -> int:
    return spec.intermediate or 2 * spec.hidden


def check_spec(spec: TinySpec) -> Architecture:
    """The spec's architecture; ValueError naming what does not fit."""
    arch = ARCHITECTURES.get(spec.arch)
    if arch is None:
        raise ValueError(f"unknown architecture {spec.arch!r}: one of {', '.join(ARCHITECTURES)}")
    if spec.vocab < MIN_VOCAB:
        raise ValueError(f"--vocab must be >= {MIN_VOCAB} (byte-level BPE needs 256 + specials)")
    if spec.hidden % spec.heads:
        raise ValueError(f"hidden {spec.hidden} is not a multiple of heads {spec.heads}")
    if spec.kv_heads and spec.heads % spec.kv_heads:
        raise ValueError(f"heads {spec.heads} is not a multiple of kv heads {spec.kv_heads}")
    if spec.kv_heads not in (None, spec.heads) and not arch.gqa:
        raise ValueError(f"{spec.arch} has no grouped-query attention (--kv-heads)")
    if spec.sliding_window is not None and not arch.sliding_window:
        raise ValueError(f"{spec.arch} has no sliding-window attention")
    if spec.rope_scaling not in (None, "llama3") or (spec.rope_scaling and spec.arch != "llama"):
        raise ValueError(f"unsupported rope scaling {spec.rope_scaling!r} (only 'llama3', Llama only)")
    if (spec.post_ln or spec.word_embed_proj_dim) and spec.arch != "opt":
        raise ValueError("--post-ln and --word-embed-proj-dim are OPT options")
    return arch


def hf_config(spec: TinySpec) -> Any:
    """The transformers config of ``spec``."""
    import transformers

    arch = check_spec(spec)
    config = getattr(transformers, arch.config_class)(
        vocab_size=spec.vocab, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=arch.tied if spec.tie_embeddings is None else spec.tie_embeddings, **arch.build(spec))
    if spec.sliding_window is not None and spec.arch != "gemma2":
        config.sliding_window = spec.sliding_window
        if hasattr(config, "use_sliding_window"):  # Qwen: the window is off unless asked
            config.use_sliding_window = True
            config.max_window_layers = 0
    if arch.rope:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.rope_scaling == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": max(16, spec.max_position // 8)}
        partial = getattr(config, "rope_parameters", None) or {}
        if "partial_rotary_factor" in partial:  # GPT-NeoX rotates only part of each head
            rope["partial_rotary_factor"] = partial["partial_rotary_factor"]
        config.rope_parameters = rope
    return config


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE over the bundled corpus with exactly ``vocab_size`` tokens (added
    tokens fill what the corpus's merges do not reach); returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    learned = tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<t{i}>", normalized=False) for i in range(learned, vocab_size)])
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    return tok


def make_tiny_model(out_dir: str | Path, spec: TinySpec) -> Path:
    """Write config.json, tokenizer files and safetensors weights for ``spec`` into ``out_dir``."""
    import torch

    arch = check_spec(spec)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = hf_config(spec)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "norm" in name or ".ln_" in name:  # RMSNorm / LayerNorm weights, HF inits them to 1
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
    if arch.chat_template:
        tok_config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2) + "\n")
    return out
