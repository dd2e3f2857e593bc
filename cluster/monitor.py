"""`liquid monitor RUN_DIR [--follow] [--plot OUT.png]`: a run's throughput, loss, MFU, expert load,
checkpoints and workers, read from its run directory (nothing else needed: works on a login node, on a
copy of the directory, while the run goes on or after it ended).

Without --follow it prints one view and exits: the run's state, the latest metrics record in full, a table
of the last N records, totals (tokens, elapsed over all attempts, mean tokens/s, best and last loss), the
checkpoints present and every worker's status. --follow prints that view, then only new lines every few
seconds (the live progress line of each new record, checkpoints completed, worker status changes; plain
lines, log-friendly) until the run's summary.json appears or Ctrl-C. --plot OUT.png draws loss, tokens/s,
MFU and expert-load imbalance over steps (tokens on the top axis) with matplotlib's Agg renderer.
An elastic job's resizes (resizes.jsonl: when, from what size to what size, why, steps recomputed) are listed
too, and --follow prints each new one.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkpoints.manifest import MANIFEST
from pretrain.run_dir import CONFIG, METRICS, SUMMARY, WORKERS, RunDir
from pretrain.train.metrics import fmt_duration, format_line, human, progress_bar, run_target, val_losses


# ----------------------------------------------------------------------------------------------- reading


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records in step order (a line cut by a crash or still being written is skipped)."""
    path = RunDir(run_dir).metrics_file
    by_step = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return [by_step[s] for s in sorted(by_step)]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def read_limits(run_dir: Path) -> tuple[int | None, int | None]:
    """(train.max_steps, train.max_tokens) from the run's config.yaml (rank 0 rewrites it at every start)."""
    try:
        from omegaconf import OmegaConf

        train = OmegaConf.to_container(OmegaConf.load(RunDir(run_dir).config_file)).get("train") or {}
        return train.get("max_steps"), train.get("max_tokens")
    except Exception:  # noqa: BLE001 - no or unreadable config: the view goes without the run's target
        return None, None


def read_workers(run_dir: Path) -> list[dict]:
    return [{**w, "_mtime": _mtime(path)} for path, w in RunDir(run_dir).read_workers()]


def read_checkpoints(run_dir: Path) -> tuple[list[str], list[str], str | None]:
    """(complete checkpoints, saves in progress or left by a crash, the `latest` pointer)."""
    run = RunDir(run_dir)
    root = run.checkpoints_dir
    if not root.is_dir():
        return [], [], None
    complete = sorted(p.name for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)
                      and (p / MANIFEST).exists())
    partial = sorted(p.name for p in root.glob("step_*.tmp") if p.is_dir())
    try:
        latest = run.latest_file.read_text().strip() or None
    except OSError:
        latest = None
    return complete, partial, latest


def finished_summary(run_dir: Path) -> dict | None:
    """summary.json when it belongs to the latest attempt: written after the last metrics record, and no
    worker started since (a resumed run keeps the summary of the attempt before it until it ends)."""
    run = RunDir(run_dir)
    summary_time = _mtime(run.summary_file)
    if summary_time is None:
        return None
    metrics_time = _mtime(run.metrics_file)
    if metrics_time is not None and metrics_time > summary_time:
        return None
    for w in read_workers(run_dir):
        if w.get("status") in ("starting", "running") and (w.get("_mtime") or 0) > summary_time:
            return None
    return run.read_summary()


@dataclass
class RunState:
    run_dir: Path
    records: list[dict]
    max_steps: int | None = None
    max_tokens: int | None = None
    summary: dict | None = None
    checkpoints: list[str] = field(default_factory=list)
    partial_checkpoints: list[str] = field(default_factory=list)
    latest: str | None = None
    workers: list[dict] = field(default_factory=list)
    resizes: list[dict] = field(default_factory=list)  # an elastic job's resizes.jsonl, oldest first

    @property
    def target_steps(self) -> int:
        """train.max_steps (the last record's step when config.yaml is unreadable)."""
        return self.max_steps or (self.records[-1]["step"] if self.records else 0)

    @property
    def last_step(self) -> int:
        """The step the run ends at: max_steps, or earlier where train.max_tokens runs out."""
        if not self.records:
            return self.target_steps
        return run_target(self.records[-1], max_steps=self.target_steps, max_tokens=self.max_tokens)[0]


def check_run_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory")
    if not RunDir(run_dir).looks_like_run():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG}, {METRICS}, {WORKERS}/ or {SUMMARY})")
    return run_dir


def no_metrics_error(run_dir: Path) -> ValueError:
    path = RunDir(run_dir).metrics_file
    what = "is empty" if path.exists() else "does not exist"
    return ValueError(f"no metrics yet in {run_dir}: {METRICS} {what} (rank 0 writes a record every "
                      "train.log_interval steps; --follow waits for it)")


def load_state(run_dir) -> RunState:
    run_dir = check_run_dir(run_dir)
    max_steps, max_tokens = read_limits(run_dir)
    complete, partial, latest = read_checkpoints(run_dir)
    return RunState(run_dir=run_dir, records=read_records(run_dir), max_steps=max_steps, max_tokens=max_tokens,
                    summary=finished_summary(run_dir), checkpoints=complete, partial_checkpoints=partial,
                    latest=latest, workers=read_workers(run_dir), resizes=RunDir(run_dir).read_resizes())


# ----------------------------------------------------------------------------------------------- totals


def totals(records: list[dict]) -> dict:
    """Tokens, wall time over all attempts, mean tokens/s (over the logged windows: each window's tokens
    over its time), best and last loss."""
    if not records:
        return {}
    elapsed, attempts, prev_elapsed, prev_start = 0.0, 1, 0.0, None
    window_tokens, window_time, prev_tokens = 0.0, 0.0, 0
    for r in records:
        e = r.get("elapsed_s") or 0.0
        start = r["time"] - e if r.get("time") else None  # when this record's attempt started its clock
        if e < prev_elapsed or (start is not None and prev_start is not None and abs(start - prev_start) > 1.0):
            elapsed += prev_elapsed  # a resumed attempt: its clock started again
            attempts += 1
        prev_elapsed, prev_start = e, start
        delta = r["tokens"] - prev_tokens
        prev_tokens = r["tokens"]
        if delta > 0 and r.get("tokens_per_s"):
            window_tokens += delta
            window_time += delta / r["tokens_per_s"]
    elapsed += prev_elapsed
    best = min(records, key=lambda r: r["loss"])
    return {"tokens": records[-1]["tokens"], "elapsed_s": elapsed, "attempts": attempts,
            "mean_tokens_per_s": window_tokens / window_time if window_time else None,
            "best_loss": best["loss"], "best_step": best["step"],
            "last_loss": records[-1]["loss"], "last_step": records[-1]["step"]}


# ----------------------------------------------------------------------------------------------- the view


def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ago(t: float | None, now: float | None = None) -> str:
    return "?" if not t else f"{fmt_duration((now or time.time()) - t)} ago"


def status_line(state: RunState) -> str:
    head = f"run {state.run_dir}"
    last = state.records[-1] if state.records else None
    if state.summary is not None:
        s = state.summary
        word = "stopped on request" if s.get("stopped") else "finished"
        loss = (f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s.get("last_loss") is not None
                and s.get("first_loss") is not None else "")
        return f"{head}: {word} at step {s.get('steps')}, {s.get('tokens', 0):,} tokens{loss}"
    statuses = [w.get("status") for w in state.workers]
    if any(s in ("starting", "running") for s in statuses):
        word = "running"
    elif statuses and all(s == "failed" for s in statuses):
        word = "failed (no summary; a restart may follow)"
    else:
        word = "no summary yet"
    where = f", step {last['step']}/{state.last_step}, last record {_ago(last.get('time'))}" if last else ""
    return f"{head}: {word}{where}"


def latest_block(state: RunState) -> list[str]:
    r = state.records[-1]
    last_step, target = run_target(r, max_steps=state.target_steps, max_tokens=state.max_tokens)
    fraction = min(r["tokens"] / target, 1.0) if target else 0.0
    devices = r.get("devices") or 1
    tps = r.get("tokens_per_s")
    per_layer = r.get("expert_load_per_layer")
    load = _f(r.get("expert_load_max_over_mean"), ".3f")
    if per_layer:
        load += " (per MoE layer: " + " ".join(f"{x:.3f}" for x in per_layer) + ")"
    mfu = (f"{r['mfu']:.2%}" if r.get("mfu") is not None else "n/a (peak FLOP/s of the device unknown, e.g. CPU)")
    lines = [
        f"latest record: step {r['step']}/{last_step}, {_ago(r.get('time'))}",
        f"  progress     {progress_bar(fraction)} {fraction:.1%} of {target:,} tokens"
        + (" (train.max_tokens)" if state.max_tokens else ""),
        f"  loss         {r['loss']:.4f}    lr {_f(r.get('lr'), '.3e')}    grad norm {_f(r.get('grad_norm'), '.4g')}",
        *[f"  val loss     {name}: {loss:.4f} (perplexity {_f(ppl, '.2f')}) at step {at}"
          for name, (at, loss, ppl) in last_validation(state.records).items()],
        f"  tokens       {r['tokens']:,}",
        f"  tokens/s     {_f(tps, ',.0f')} ({_f(tps / devices if tps else None, ',.0f')} per device, "
        f"{devices} device{'s' if devices != 1 else ''})",
        f"  MFU          {mfu}",
        f"  data wait    {_f(r.get('data_wait_frac'), '.2%')} of the window",
        "  ckpt stall   " + (f"{r['checkpoint_stall_s']:.3f} s (a checkpoint was saved in this window)"
                              if r.get("checkpoint_stall_s") is not None else "- (no save in this window)"),
        f"  expert load  max/mean {load}",
        f"  elapsed      {fmt_duration(r.get('elapsed_s'))} (this attempt)    eta {fmt_duration(r.get('eta_s'))}",
    ]
    known = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "devices", "mfu", "data_wait_frac",
             "checkpoint_stall_s", "expert_load_max_over_mean", "expert_load_per_layer", "elapsed_s", "eta_s",
             "time"}
    lines += [f"  {k:<12} {json.dumps(v)}" for k, v in r.items() if k not in known and not k.startswith("val")]
    return lines


def last_validation(records: list[dict]) -> dict[str, tuple[int, float, float | None]]:
    """name -> (step, loss, perplexity) of each held-out stream's newest validation, in first-seen order."""
    out = {}
    for r in records:
        for name, loss in val_losses(r).items():
            out[name] = (r["step"], loss, r.get(f"val/{name}/perplexity"))
    return out


TABLE_HEADER = (f"{'step':>8} {'loss':>8} {'val':>8} {'tok/s':>10} {'tok/s/dev':>10} {'MFU':>7} {'wait':>6} "
                f"{'stall s':>8} {'load':>6} {'tokens':>8} {'elapsed':>8}")


def table_row(r: dict) -> str:
    devices = r.get("devices") or 1
    tps = r.get("tokens_per_s")
    val = list(val_losses(r).values())  # the first held-out stream's
    return (f"{r['step']:>8} {r['loss']:>8.4f} {_f(val[0] if val else None, '.4f'):>8} {_f(tps, ',.0f'):>10} "
            f"{_f(tps / devices if tps else None, ',.0f'):>10} {_f(r.get('mfu'), '.1%', 'n/a'):>7} "
            f"{_f(r.get('data_wait_frac'), '.1%'):>6} {_f(r.get('checkpoint_stall_s'), '.2f'):>8} "
            f"{_f(r.get('expert_load_max_over_mean'), '.2f'):>6} {human(r['tokens']):>8} "
            f"{fmt_duration(r.get('elapsed_s')):>8}")


def totals_line(records: list[dict]) -> str:
    t = totals(records)
    attempts = f" over {t['attempts']} attempts" if t["attempts"] > 1 else ""
    return (f"totals: {t['tokens']:,} tokens, elapsed {fmt_duration(t['elapsed_s'])}{attempts}, "
            f"mean {_f(t['mean_tokens_per_s'], ',.0f')} tok/s, best loss {t['best_loss']:.4f} (step "
            f"{t['best_step']}), last loss {t['last_loss']:.4f} (step {t['last_step']})")


def checkpoints_line(state: RunState) -> str:
    if not state.checkpoints and not state.partial_checkpoints:
        return "checkpoints: none"
    text = "checkpoints: " + (", ".join(state.checkpoints) or "none complete")
    if state.latest:
        text += f" (latest {state.latest})"
    if state.partial_checkpoints:
        text += "; in progress or incomplete: " + ", ".join(state.partial_checkpoints)
    return text


def worker_line(w: dict) -> str:
    extra = []
    for key in ("step", "start_step"):
        if w.get(key) is not None:
            extra.append(f"{key.replace('_', ' ')} {w[key]}")
    if w.get("error"):
        extra.append(str(w["error"])[:200])
    return (f"  rank {w['rank']:<4} pid {w.get('pid', '?'):<8} host {w.get('host', '?'):<20} "
            f"{w.get('status', '?'):<9} {_ago(w.get('time'))}" + (f" ({'; '.join(extra)})" if extra else ""))


def resize_line(r: dict) -> str:
    """One resize of an elastic job: when, from what size to what size, why, and the steps trained again."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])) if r.get("time") else "?"
    recomputed = r.get("steps_recomputed")
    return (f"  {when}  {r.get('from_workers', '?')} -> {r.get('to_workers', '?')} workers ({r.get('reason', '?')}) "
            f"after step {r.get('last_step', '?')}: resumed from step {r.get('checkpoint_step', '?')}, "
            f"{'?' if recomputed is None else recomputed} step{'' if recomputed == 1 else 's'} recomputed")


def resizes_block(resizes: list[dict]) -> list[str]:
    if not resizes:
        return []
    return [f"resizes ({len(resizes)}, elastic):", *(resize_line(r) for r in resizes)]


def render(state: RunState, *, last: int = 10) -> str:
    """The whole view of a run directory (raises the no-metrics error when it has no record yet)."""
    if not state.records:
        raise no_metrics_error(state.run_dir)
    lines = [status_line(state), *latest_block(state), "", f"last {min(last, len(state.records))} records:",
             TABLE_HEADER, *(table_row(r) for r in state.records[-last:]), "", totals_line(state.records),
             checkpoints_line(state), *resizes_block(state.resizes)]
    world = next((w.get("world") for w in state.workers if w["rank"] == 0), None)
    current = [w for w in state.workers if world is None or w["rank"] < world]
    if current:
        lines += [f"workers ({len(current)}):", *(worker_line(w) for w in current)]
    if len(current) < len(state.workers):  # an elastic job that shrank: files of ranks it no longer has
        lines += [f"workers of an earlier, larger attempt ({len(state.workers) - len(current)}):",
                  *(worker_line(w) for w in state.workers if w not in current)]
    if not state.workers:
        lines.append("workers: none recorded")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the plot


def plot(state: RunState, out) -> Path:
    """Four panels over steps (tokens on the top axis): loss, tokens/s, MFU, expert-load max/mean."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend or global state, renders with Agg
    from matplotlib.ticker import FuncFormatter

    records = state.records
    if not records:
        raise no_metrics_error(state.run_dir)
    steps = [r["step"] for r in records]
    last = records[-1]
    per_step = last["tokens"] / last["step"] if last["step"] else 0.0

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    (ax_loss, ax_tps), (ax_mfu, ax_load) = fig.subplots(2, 2)

    def series(key, scale=1.0):
        pts = [(r["step"], r[key] * scale) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    marker = "o" if len(records) <= 50 else None
    ax_loss.plot(*series("loss"), marker=marker, ms=3, label="loss (window mean)")
    validated = last_validation(records)
    for name in validated:
        ax_loss.plot(*series(f"val/{name}/loss"), marker="s", ms=4, label=f"validation: {name}")
    if validated:
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("loss")
    ax_loss.set_ylabel("loss")

    ax_tps.plot(*series("tokens_per_s"), marker=marker, ms=3, label="total")
    per_dev = [(r["step"], r["tokens_per_s"] / (r.get("devices") or 1)) for r in records
               if r.get("tokens_per_s") is not None]
    if any((r.get("devices") or 1) > 1 for r in records):
        ax_tps.plot([p[0] for p in per_dev], [p[1] for p in per_dev], marker=marker, ms=3, label="per device")
    ax_tps.set_title("throughput")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    ax_tps.set_ylim(bottom=0)
    ax_tps.legend(loc="lower right", fontsize=8)

    mfu_steps, mfu = series("mfu", 100.0)
    ax_mfu.set_title("MFU")
    ax_mfu.set_ylabel("MFU (%)")
    if mfu:
        ax_mfu.plot(mfu_steps, mfu, marker=marker, ms=3)
        ax_mfu.set_ylim(bottom=0)
    else:
        ax_mfu.text(0.5, 0.5, "MFU unknown on CPU\n(no peak FLOP/s for this device)", ha="center", va="center",
                    transform=ax_mfu.transAxes, fontsize=12, color="0.4")
        ax_mfu.set_xlim(ax_loss.get_xlim())  # the same steps as the other panels
        ax_mfu.set_yticks([])

    ax_load.set_title("expert load imbalance (max/mean tokens per expert)")
    ax_load.set_ylabel("max / mean")
    layers = max((len(r.get("expert_load_per_layer") or []) for r in records), default=0)
    for i in range(layers):
        pts = [(r["step"], r["expert_load_per_layer"][i]) for r in records
               if len(r.get("expert_load_per_layer") or []) > i]
        ax_load.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, alpha=0.6, label=f"MoE layer {i}")
    load_steps, load = series("expert_load_max_over_mean")
    if load:
        ax_load.plot(load_steps, load, color="black", marker=marker, ms=3, label="max over layers")
        ax_load.axhline(1.0, color="0.5", ls="--", lw=0.8)
        ax_load.legend(loc="upper right", fontsize=8)
    else:
        ax_load.text(0.5, 0.5, "no MoE layers (dense model)", ha="center", va="center",
                     transform=ax_load.transAxes, color="0.4")

    for ax in (ax_loss, ax_tps, ax_mfu, ax_load):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if per_step > 0:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
            top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
            top.set_xlabel("tokens", fontsize=8)
            top.tick_params(labelsize=8)
    t = totals(records)
    fig.suptitle(f"{state.run_dir.name}: step {last['step']}/{state.last_step}, {human(last['tokens'])} tokens, "
                 f"loss {t['last_loss']:.4f} (best {t['best_loss']:.4f}), "
                 f"mean {_f(t['mean_tokens_per_s'], ',.0f')} tok/s")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)  # a viewer never sees half a file
    return out


# ----------------------------------------------------------------------------------------------- follow


def follow(run_dir, *, interval: float = 5.0, last: int = 10, plot_path=None, stream=None,
           max_wait_s: float | None = None) -> int:
    """Print the view, then new lines every `interval` s until the run's summary.json appears.
    `max_wait_s` (tests) gives up after that long; returns 0 when the run ended, 1 when it gave up."""
    out = stream or sys.stdout

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    started = time.monotonic()
    state = load_state(run_dir)
    waited = False
    while not state.records and state.summary is None:
        if not waited:
            say(f"waiting for the first record in {RunDir(run_dir).metrics_file} (every {interval:g} s; Ctrl-C stops)")
            waited = True
        if max_wait_s is not None and time.monotonic() - started > max_wait_s:
            return 1
        time.sleep(interval)
        state = load_state(run_dir)
    if not state.records:  # finished without a record (nothing left to train)
        say(status_line(state))
        return 0
    say(render(state, last=last))
    if plot_path:
        say(f"plot: {plot(state, plot_path)}")
    last_step = state.records[-1]["step"]
    seen_ckpts = set(state.checkpoints)
    worker_status = {w["rank"]: (w.get("status"), w.get("pid")) for w in state.workers}
    seen_resizes = len(state.resizes)
    if state.summary is None:
        say(f"following {Path(run_dir)} every {interval:g} s until {SUMMARY} appears (Ctrl-C stops)")
    while state.summary is None:
        if max_wait_s is not None and time.monotonic() - started > max_wait_s:
            return 1
        time.sleep(interval)
        state = load_state(run_dir)
        printer_args = {"max_steps": state.target_steps, "max_tokens": state.max_tokens}
        if state.records and state.records[-1]["step"] < last_step:
            last_step = state.records[-1]["step"]
            say(f"{METRICS} was rewritten: a resumed attempt keeps the records up to step {last_step}")
        new = [r for r in state.records if r["step"] > last_step]
        for r in new:
            say(format_line(r, **printer_args))
        if new:
            last_step = new[-1]["step"]
        for name in state.checkpoints:
            if name not in seen_ckpts:
                say(f"checkpoint: {name} complete")
        seen_ckpts = set(state.checkpoints)
        for r in state.resizes[seen_resizes:]:
            say("resize:" + resize_line(r)[1:])
        seen_resizes = len(state.resizes)
        for w in state.workers:
            now = (w.get("status"), w.get("pid"))
            if worker_status.get(w["rank"]) != now:
                say("worker:" + worker_line(w)[1:])
                worker_status[w["rank"]] = now
        if new and plot_path:
            plot(state, plot_path)
    say(totals_line(state.records) if state.records else "no records")
    say(status_line(state))
    if plot_path:
        say(f"plot: {plot(state, plot_path)}")
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def _cmd_monitor(args) -> int:
    if args.interval <= 0 or args.last <= 0:
        raise ValueError("--interval and --last must be > 0")
    if args.follow:
        try:
            return follow(args.run_dir, interval=args.interval, last=args.last, plot_path=args.plot)
        except KeyboardInterrupt:
            return 0
    state = load_state(args.run_dir)
    print(render(state, last=args.last))
    if args.plot:
        print(f"plot: {plot(state, args.plot)}")
    return 0


def add_monitor_parser(sub) -> None:
    p = sub.add_parser("monitor", help="a run's loss, tokens/s, MFU, expert load, checkpoints and workers "
                                       "(from its run directory)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--follow", action="store_true",
                   help="keep printing new records, checkpoints and worker changes until summary.json appears")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --follow (default 5)")
    p.add_argument("--last", type=int, default=10, help="records in the table (default 10)")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="also write a PNG: loss, tokens/s, MFU and expert load over steps (with --follow: "
                        "redrawn as records arrive)")
    p.set_defaults(func=_cmd_monitor)
