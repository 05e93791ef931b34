"""The ``hydraserve model`` command group: ``tiny`` (here) and ``push`` (hydraserve.weights.push).

Wired by hydraserve.cli; only argparse at import time, torch/transformers inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``model`` subcommands; ``push`` joins when hydraserve.weights.push exists."""
    subparsers = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    configure_tiny(subparsers.add_parser(
        "tiny", help="write a tiny random model (HF layout) for tests and demos",
        description="Write a tiny random model of a common architecture: config.json, tokenizer.json, "
                    "tokenizer_config.json and safetensors weights (needs transformers: pip install '.[test]')."))
    try:
        from hydraserve.weights.push import configure_push
    except ModuleNotFoundError as exc:
        if exc.name is None or not "hydraserve.weights.push".startswith(exc.name):
            raise
    else:
        configure_push(subparsers)
    parser.set_defaults(func=lambda args: _no_subcommand(parser))


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def configure_tiny(p: argparse.ArgumentParser) -> None:
    from hydraserve.modeltools.tiny import ARCHITECTURES, TinySpec

    d = TinySpec()
    p.add_argument("--arch", choices=list(ARCHITECTURES), default=d.arch)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (vLLM on CPUs needs hidden/heads >= 32)")
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query key/value heads (default: heads)")
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2 x hidden)")
    p.add_argument("--max-position", type=int, default=d.max_position)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d.dtype)
    p.add_argument("--shard-size", default=None, help='shard the safetensors, e.g. "200KB"')
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init-std", type=float, default=d.init_std)
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="tie lm_head to the token embedding (default: the architecture's usual choice)")
    p.add_argument("--rope-scaling", choices=["llama3"], default=None, help="Llama only")
    p.add_argument("--rope-theta", type=float, default=d.rope_theta)
    p.add_argument("--sliding-window", type=int, default=None, help="Mistral, Qwen, Gemma 2, Phi-3, Mixtral")
    p.add_argument("--experts", type=int, default=d.experts, help="Mixtral: local experts")
    p.add_argument("--post-ln", action="store_true", help="OPT: do_layer_norm_before=False")
    p.add_argument("--word-embed-proj-dim", type=int, default=None, help="OPT: embedding width")
    p.set_defaults(func=run_tiny)


def run_tiny(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        print("hydraserve model tiny needs transformers: pip install '.[test]'", file=sys.stderr)
        return 1
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    spec = TinySpec(
        arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.kv_heads, vocab=args.vocab, intermediate=args.intermediate,
        max_position=args.max_position, dtype=args.dtype, shard_size=args.shard_size,
        seed=args.seed, init_std=args.init_std, tie_embeddings=args.tie_embeddings,
        rope_scaling=args.rope_scaling, rope_theta=args.rope_theta, sliding_window=args.sliding_window,
        experts=args.experts, post_ln=args.post_ln, word_embed_proj_dim=args.word_embed_proj_dim,
    )
    try:
        out = make_tiny_model(args.out, spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sorted(f.name for f in out.iterdir())
    print(json.dumps({"out": str(out), "files": files}))
    return 0
