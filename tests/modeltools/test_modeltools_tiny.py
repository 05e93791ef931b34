"""``hydraserve model tiny``: the files it writes are a valid HF model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from hydraserve.cli import main
from hydraserve.modeltools.tiny import MIN_VOCAB, TinySpec, make_tiny_model
from hydraserve.runtime.tokenizer import Tokenizer


def test_cli_writes_sharded_llama_with_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    code = main(["model", "tiny", "--arch", "llama", "--out", str(out), "--layers", "3", "--hidden", "96",
                 "--heads", "6", "--kv-heads", "2", "--vocab", "400", "--intermediate", "160",
                 "--dtype", "bfloat16", "--shard-size", "60KB", "--seed", "5", "--tie-embeddings",
                 "--rope-scaling", "llama3", "--rope-theta", "500000"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "model.safetensors.index.json" in report["files"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (3, 96, 2)
    assert config["intermediate_size"] == 160 and config["vocab_size"] == 400
    assert config["tie_word_embeddings"] is True
    rope = config.get("rope_parameters") or {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) > 1 and "lm_head.weight" not in weight_map  # tied: not stored
    with safe_open(str(out / weight_map["model.layers.0.input_layernorm.weight"]), "pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert str(norm.dtype) == "torch.bfloat16" and (norm != 1).any()  # norm weights are perturbed
    tok = Tokenizer.from_dir(str(out))
    assert tok.vocab_size == 400 and tok.chat_template is not None
    assert tok.decode(tok.encode("The lighthouse")) == "The lighthouse"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt",
                                  "mixtral"])
def test_every_architecture_is_a_model_transformers_loads(arch: str, tmp_path: Path) -> None:
    import transformers

    out = make_tiny_model(tmp_path / arch, TinySpec(arch=arch))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 512
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM's CPU attention needs >= 32


def test_the_tokenizer_covers_the_whole_embedding(tmp_path: Path) -> None:
    """A random model emits any id of its embedding: each must decode to some text (the corpus
    alone gives ~1,080 tokens; added tokens fill the rest)."""
    out = make_tiny_model(tmp_path / "m", TinySpec(vocab=2048))
    tok = Tokenizer.from_dir(str(out))
    assert tok.vocab_size == 2048
    assert all(tok.decode([i]) for i in range(3, 2048))


def test_opt_options_and_same_seed_same_weights(tmp_path: Path) -> None:
    spec = TinySpec(arch="opt", post_ln=True, word_embed_proj_dim=32, seed=3)
    a = make_tiny_model(tmp_path / "a", spec)
    b = make_tiny_model(tmp_path / "b", spec)
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "opt" and config["do_layer_norm_before"] is False
    assert config["word_embed_proj_dim"] == 32
    assert "chat_template" not in json.loads((a / "tokenizer_config.json").read_text())
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    c = make_tiny_model(tmp_path / "c", TinySpec(arch="opt", post_ln=True, word_embed_proj_dim=32, seed=4))
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bad_sizes_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "tiny", "--out", str(tmp_path / "x"), "--vocab", str(MIN_VOCAB - 1)]) == 2
    assert "--vocab" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiple"):
        make_tiny_model(tmp_path / "y", TinySpec(heads=4, kv_heads=3))
    with pytest.raises(ValueError, match="grouped-query"):
        make_tiny_model(tmp_path / "z", TinySpec(arch="gpt2", kv_heads=1))
    with pytest.raises(ValueError, match="unknown architecture"):
        make_tiny_model(tmp_path / "w", TinySpec(arch="bert"))
