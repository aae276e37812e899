"""The `moe-serve` command line: one parser, one small handler per subcommand.

Each subcommand is an `add_<name>_command(subparsers)` function that declares its arguments and
sets `handler`; the handler takes the parsed namespace, does its work through library
functions with typed arguments, and returns the exit status. Heavy imports (torch, Ray) happen
inside handlers so `moe-serve --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def add_demo_model_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model", help="write the built-in demo checkpoint (small random Mixtral) to a directory",
        description="Write the built-in demo checkpoint: a small random Mixtral-shaped HuggingFace "
                    "checkpoint with a trained byte-level BPE tokenizer. Prints its path. An up-to-date "
                    "one is kept; a directory holding anything else is refused.",
    )
    parser.add_argument(
        "dir", nargs="?", type=Path, default=None,
        help="output directory (default: $MOE_SERVE_DEMO_DIR or ~/.cache/moe-serve/demo-model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.set_defaults(handler=run_demo_model)


def run_demo_model(args: argparse.Namespace) -> int:
    from workers.demo_checkpoint import ensure_demo_checkpoint

    try:
        out = ensure_demo_checkpoint(args.dir, seed=args.seed)
    except FileExistsError as exc:
        print(f"moe-serve demo-model: {exc}", file=sys.stderr)
        return 1
    print(out.resolve())
    return 0


# Subcommands in the order `--help` lists them. `serve` (and `bench`) register here, each as an
# `add_<name>_command` function like the one above.
COMMANDS = (
    add_demo_model_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve", description="Serve Mixtral-style MoE models on a Ray cluster.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
