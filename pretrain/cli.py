"""The `liquid` command line: pretrain, plan, bench.

Each subcommand takes a preset name or YAML path followed by `key=value` overrides.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_pretrain(args) -> int:
    from pretrain.config import load_config
    from pretrain.train.worker import train_main

    cfg = load_config(args.config, args.overrides)
    summary = train_main(cfg)
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, loss {summary['first_loss']:.4f} -> "
          f"{summary['last_loss']:.4f}; run directory {summary['run_dir']}")
    return 0


def _cmd_plan(args) -> int:
    from pretrain.config import load_config
    from pretrain.train.plan import build_plan, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg, mfu=args.mfu, gpus=args.gpus, device=args.device, tokens=args.tokens)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def _cmd_bench(args) -> int:
    from pretrain import bench

    bench.main_scan(args.rest)
    return 0


def _split_config(argv_rest: list[str]) -> tuple[str | None, list[str]]:
    """The first positional that is not key=value is the config; the rest are overrides."""
    if argv_rest and "=" not in argv_rest[0]:
        return argv_rest[0], argv_rest[1:]
    return None, argv_rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liquid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train (defaults: tiny preset, embedded corpus)")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="preset name or YAML, then overrides")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("plan", help="size a run: parameters, FLOPs/token, memory per rank, tokens/s, days")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default cluster.num_workers)")
    p.add_argument("--device", default="H100", help="H100, H200 or A100 (peak bf16 dense FLOP/s)")
    p.add_argument("--tokens", type=float, default=10e12, help="training tokens for the time estimate")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument("which", choices=["scan"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see liquid bench scan --help)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "args"):
        args.config, args.overrides = _split_config(args.args)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"liquid {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"liquid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
