"""The `liquid` command line: pretrain, plan, dryrun, data, bench, export, eval.

Each subcommand takes a preset name or YAML path followed by `key=value` overrides.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_pretrain(args) -> int:
    from cluster.launch import launch
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(_done_line(launch(cfg)))
    return 0


def _done_line(summary: dict) -> str:
    loss = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}" if summary.get("last_loss") is not None
            else "no steps left to train")
    parts = [f"{'stopped' if summary.get('stopped') else 'done'}: step {summary['steps']}, "
             f"{summary['tokens']:,} tokens, {loss}"]
    if summary.get("val_loss"):
        parts.append("held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in summary["val_loss"].items()))
    if summary.get("resumed_from"):
        parts.append(f"resumed from {summary['resumed_from']}")
    if summary.get("checkpoints"):
        parts.append(f"last checkpoint {summary['checkpoints'][-1]}")
    if summary.get("export"):
        parts.append(f"export {summary['export']}")
    return "; ".join(parts + [f"run directory {summary['run_dir']}"])


def _cmd_resume(args) -> int:
    from checkpoints.manager import find_checkpoint
    from cluster.launch import launch
    from pretrain.config import load_config
    from pretrain.run_dir import RunDir

    run = RunDir(args.run_dir)
    if not run.has_config():
        raise ValueError(f"{run.path} is not a run directory (no {run.config_file.name})")
    find_checkpoint(run.path, checksums=False)  # fails clearly when nothing can be resumed; the ranks hash it
    cfg = load_config(str(run.config_file),
                      [*args.overrides, "checkpoint.resume=auto", f"run.dir={run.path}"])
    print(_done_line(launch(cfg)))
    return 0


def _cmd_plan(args) -> int:
    from pretrain.config import load_config
    from pretrain.train.plan import build_plan, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg, mfu=args.mfu, gpus=args.gpus, device=args.device, tokens=args.tokens)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def _cmd_dryrun(args) -> int:
    """Exit 0 when the layout fits the device (or no device budget applies), 1 when it does not."""
    from pretrain.config import load_config
    from pretrain.train.dryrun import DryRunOptions, dry_run, format_report, report

    cfg = load_config(args.config, args.overrides)
    print(f"liquid dryrun: {cfg.run.name}, rank {args.rank} of {cfg.parallel.dp * cfg.parallel.cp}, "
          "one training step on fake tensors (minutes at full size)...", file=sys.stderr, flush=True)
    measured = dry_run(cfg, DryRunOptions(rank=args.rank, imbalance=args.imbalance))
    rep = report(cfg, measured, device=args.device)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0 if rep.get("fits", {}).get("fits", True) else 1


def _cmd_tokenizer_train(args) -> int:
    from data_pipeline.sources import SourceStats, expand_inputs, iter_texts
    from data_pipeline.tokenizer import TextTokenizer, train_tokenizer

    files = expand_inputs(args.input)
    stats = SourceStats()
    texts = (t for f in files for t in iter_texts(f, text_field=args.text_field, stats=stats))
    path = train_tokenizer(texts, vocab_size=args.vocab_size, out_dir=args.out)
    if stats.documents == 0:
        raise ValueError(f"no documents in {args.input} (skipped: {stats.skipped_where[:3]})")
    tok = TextTokenizer(path)
    print(f"tokenizer: {path} ({tok.vocab_size} tokens, model.vocab_size={tok.padded_vocab_size}); "
          f"trained on {stats.documents:,} documents, {stats.bytes / 2**20:.1f} MiB")
    return 0


def _cmd_prepare(args) -> int:
    from cluster.safety import ray_init_kwargs
    from data_pipeline.prepare import prepare, summary_line

    # How to start Ray is the cluster layer's choice: a loopback-only local Ray unless --ray-address is given.
    ray_init = None if args.no_ray else ray_init_kwargs(args.ray_address)
    summary = prepare(args.input, args.output, args.tokenizer, text_field=args.text_field,
                      block_tokens=args.block_tokens, ray_init=ray_init, use_ray=not args.no_ray,
                      overwrite=args.overwrite, skip_bad=args.skip_bad_files, task_mb=args.task_mb,
                      eos_token=args.eos_token)
    print(summary_line(summary))
    return 0


def _add_data_parsers(sub) -> None:
    from data_pipeline.format import BLOCK_TOKENS
    from data_pipeline.prepare import TASK_MB

    data = sub.add_parser("data", help="tokenizer training and shard preparation")
    dsub = data.add_subparsers(dest="data_command", required=True)
    tok = dsub.add_parser("tokenizer", help="tokenizer commands")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer locally")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.json")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.set_defaults(func=_cmd_tokenizer_train)

    p = dsub.add_parser("prepare", help="raw documents -> tokenized MDS shards (parallel on Ray)")
    p.add_argument("--input", nargs="+", required=True, help="files (.txt .jsonl[.gz|.zst] .parquet), dirs or globs")
    p.add_argument("--output", required=True, help="local directory or URL (s3://bucket/prefix)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory holding one)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS, help="tokens per MDS sample")
    p.add_argument("--eos-token", default=None,
                   help="the tokenizer's end-of-document token, when it is none of the usual names "
                        "(<|endoftext|>, </s>, ...) and no tokenizer_config.json beside it names one")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a local one)")
    p.add_argument("--no-ray", action="store_true", help="run in this process (small inputs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    p.add_argument("--task-mb", type=float, default=TASK_MB,
                   help=f"input MB per task (default {TASK_MB:g}): a task's files share blocks, so only its last "
                        "block is padded; a larger file is a task of its own; 0: one task per file")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out input files that cannot be read (corrupt, invalid JSON) and list them in the "
                        "summary, instead of stopping")
    p.set_defaults(func=_cmd_prepare)


# `liquid bench NAME ...`: NAME -> "module:function" taking the rest of the command line (imported when run).
BENCHMARKS = {"scan": "pretrain.bench.scan:main_scan", "data": "pretrain.bench.data:main_data",
              "step": "pretrain.bench.step:main_step", "checkpoint": "pretrain.bench.checkpoint:main_checkpoint",
              "gpu": "pretrain.bench.gpu:main_gpu", "hf": "pretrain.bench.hf:main_hf",
              "loss": "pretrain.bench.loss:main_loss"}


def _cmd_bench(args) -> int:
    import importlib

    module, function = BENCHMARKS[args.which].split(":")
    getattr(importlib.import_module(module), function)(args.rest)
    return 0


def _cmd_export(args) -> int:
    from checkpoints.export import export_run, summary_line

    summary = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, fmt=args.format,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(summary_line(summary))
    return 0


def _cmd_eval(args) -> int:
    from checkpoints.evaluate import evaluate, result_line

    if args.held_out:
        if args.input:
            raise ValueError("--held-out scores the run's eval streams; leave out --input")
        from pretrain.train.validate import evaluate_held_out

        print(result_line(evaluate_held_out(args.source, step=args.step, device=args.device, tokens=args.tokens)))
        return 0
    if not args.input:
        raise ValueError("name the held-out text with --input FILE..., or score the run's eval streams with --held-out")
    res = evaluate(args.source, args.input, step=args.step, seq_len=args.seq_len, batch_size=args.batch_size,
                   device=args.device, text_field=args.text_field, eos_token=args.eos_token)
    print(result_line(res))
    return 0


def _add_export_parsers(sub) -> None:
    p = sub.add_parser("export", help="a run's checkpoint -> Hugging Face safetensors, config and tokenizer")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint at this step (default: the newest)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default) or fp32")
    p.add_argument("--format", default="auto",
                   help="auto (default: lfm2_moe when the model fits it, else liquid_moe), lfm2_moe or liquid_moe")
    p.add_argument("--max-shard-size", default="5GB",  # checkpoints.export.DEFAULT_MAX_SHARD_SIZE
                   help="largest safetensors file, e.g. 5GB or 500MB (default 5GB, decimal as in transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="loss and perplexity of a run's checkpoint or an export on held-out text")
    p.add_argument("source", metavar="RUN_DIR_OR_EXPORT_DIR")
    p.add_argument("--input", nargs="+", default=None, help="files (.txt .jsonl[.gz|.zst] .parquet), dirs or globs")
    p.add_argument("--held-out", action="store_true",
                   help="for a run directory: score its validation rows (eval.streams, eval.tokens) as training "
                        "validates, instead of --input")
    p.add_argument("--tokens", type=int, default=None, help="with --held-out: tokens per stream (default eval.tokens)")
    p.add_argument("--step", type=int, default=None, help="for a run directory: the checkpoint at this step")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: automatic)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--eos-token", default=None,
                   help="the end-of-document token, if the source's tokenizer does not name it")
    p.set_defaults(func=_cmd_eval)


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

    p = sub.add_parser("resume", help="continue a run from its newest complete checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes, e.g. train.max_steps=2000, or parallel.dp=1 cluster.num_workers=1 to reshard")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("plan", help="size a run: parameters, FLOPs/token, memory per rank, tokens/s, days")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default cluster.num_workers)")
    p.add_argument("--device", default="H100", help="H100, H200 or A100 (peak bf16 dense FLOP/s)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens for the time estimate (default: the config's train.max_tokens or max_steps)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("dryrun", help="one rank of the layout at full size on fake tensors: measured memory "
                                      "and FLOPs per token beside the plan's")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--rank", type=int, default=0, help="which rank of the layout to run (default 0)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="hottest expert's rows over the mean, for this rank's experts (default 1.0: balanced)")
    p.add_argument("--device", default="H100", help="H100, H200 or A100: the memory a CUDA layout must fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_dryrun)

    _add_data_parsers(sub)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument("which", choices=list(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see liquid bench scan --help)")
    p.set_defaults(func=_cmd_bench)

    _add_export_parsers(sub)
    _add_optional_parsers(sub)
    return parser


def _add_optional_parsers(sub) -> None:
    """Subcommands defined beside their code: cluster jobs (submit, status, logs, stop, jobs), monitor and chaos."""
    import importlib
    import importlib.util

    for module, function in (("cluster.jobs", "add_job_parsers"), ("cluster.monitor", "add_monitor_parser"),
                             ("cluster.chaos", "add_chaos_parser")):
        if importlib.util.find_spec(module) is not None:
            getattr(importlib.import_module(module), function)(sub)


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
