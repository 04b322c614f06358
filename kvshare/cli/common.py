"""What every command shares: the model options and the engine they build."""

from __future__ import annotations

import argparse
from typing import Any

from kvshare.errors import KVShareError

TEAMS = ["rag", "debate", "code"]
WORKLOADS = ["synthetic", "qa", "crossover", "overhead", "kernels", "wrapper", "tiers"]
WORKLOADS += ["concurrent", "branches", "routing", "serve", "redis-faults", "replicas", *TEAMS]


def engine_for(args: argparse.Namespace) -> Any:
    """The engine a command's ``--model/--device/--dtype`` (and ``--mode``) ask for."""
    from kvshare.config import EngineConfig
    from kvshare.engine.engine import Engine

    model = args.model
    if model is None and getattr(args, "workload", None) in ("overhead", "wrapper"):
        model = "random:tiny-deep"  # arithmetic negligible: what is left is overhead
    return Engine.from_pretrained(
        model,
        device=args.device,
        dtype=args.dtype,
        config=EngineConfig(mode=getattr(args, "mode", "kvshare")),
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local HF dir, .gguf, or random:SHAPE (random weights of a real shape, for "
        "timing: llama-8b, llama-1b, qwen2-7b, smollm2-135m, tiny-deep); default: embedded",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16")


def parse_lengths(text: str, option: str = "--lengths", least: int = 1) -> list[int]:
    """Comma-separated integers >= ``least`` (KVShareError naming ``option`` otherwise)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < least:
        kind = "positive integers" if least == 1 else f"integers >= {least}"
        raise KVShareError(f"{option} wants {kind} like 256,1024; got {text!r}")
    return lengths
