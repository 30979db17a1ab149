"""`warp-rlhf <command> [--config FILE] [--<field> VALUE ...]`.

Every config field is also a flag; flags override the YAML file. Any problem is one line on
stderr and exit code 2 (130 after Ctrl-C, 143 after SIGTERM); input rejected before work starts
leaves nothing behind, and finished work is never deleted (`stages.output`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from warp_rlhf.config import FIELDS, WarpConfig, config_to_dict, load_config, unknown_field
from warp_rlhf.errors import ConfigError, WarpError
from warp_rlhf.layout import OutputDir

EXIT_USAGE = 2
COMMANDS = {
    "reward": "train the Bradley–Terry reward model and report held-out pairwise accuracy",
    "train": "run WARP (I iterations x M REINFORCE runs, SLERP, LITI)",
    "evaluate": "reward, judge and KL to the SFT policy on held-out prompts",
    "run": "reward → train → evaluate from one config",
    "demo": "`run` on the embedded default (SmolLM2-135M, MiniLM reward, IMDB reviews)",
    "sweep": "train + evaluate for each value of one field",
    "experiment": "the claims of WARP (experiments/paper.yaml) or of WARM (experiments/warm.yaml)",
    "compare": "evaluated output folders against the first at matched KL: figure, table, verdict",
    "plan": "the memory of one run and of one machine, from the config alone (no weights loaded, nothing written)",
}
COMPARE_DIR = "compare"
"""Where `compare` writes its figure and tables unless --output_dir says otherwise."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        _fail(message)


def _fail(message: str) -> None:
    print(f"warp-rlhf: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="warp-rlhf", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == "compare":
            sub.add_argument("runs", nargs="+", metavar="RUN", help="an evaluated output folder (two or more)")
            sub.add_argument("--output_dir", default=COMPARE_DIR, help=f"folder of the results (default {COMPARE_DIR})")
            continue
        sub.add_argument("--config", help="YAML file of field: value (default: the embedded default)")
        sub.add_argument("--resume", action="store_true", help="continue the run in output_dir")
        sub.add_argument("--overwrite", action="store_true", help="delete output_dir's earlier run first")
        if name == "sweep":
            sub.add_argument("--param", required=True, help="the config field to sweep, e.g. liti_rate")
            sub.add_argument("--values", required=True, help="comma-separated values, e.g. 0.1,0.3,0.5")
        fields = sub.add_argument_group("config fields (override the file)")
        for field_name, f in FIELDS.items():
            fields.add_argument(f"--{field_name}", metavar="VALUE", help=f.metadata["help"], dest=f"field_{field_name}")
    return parser


def _overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, str]:
    if extra:
        flag = extra[0]
        if flag.startswith("--"):
            raise unknown_field(flag[2:].split("=")[0].replace("-", "_"))
        raise ConfigError(f"unexpected argument '{flag}'")
    prefix = "field_"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _reward(config: WarpConfig, args: argparse.Namespace) -> int:
    from warp_rlhf.stages.pipeline import prepare_output, reward_stage
    from warp_rlhf.stages.reward import reward_details

    out = prepare_output(config, overwrite=args.overwrite, config_file=args.config)
    metrics = reward_stage(config, out)
    if metrics.get("skipped"):
        print(f"no reward model to train: every reward is given (reward_funcs: {', '.join(config.reward_funcs)})")
        return 0
    reused = " (reused)" if metrics.get("reused") else ""
    print(
        f"reward model{reused}: held-out pairwise accuracy {metrics['eval_pairwise_accuracy']:.3f} "
        f"on {metrics['eval_pairs']} pairs{reward_details(metrics)}, trained on {metrics['train_pairs']} pairs in "
        f"{metrics['seconds']:.0f} s → {out / 'reward_model'}"
    )
    return 0


def _train(config: WarpConfig, args: argparse.Namespace) -> int:
    from warp_rlhf.stages.pipeline import prepare_output, train_stage

    out = prepare_output(config, overwrite=args.overwrite, config_file=args.config)
    final = train_stage(config, out, resume=args.resume)
    what = f"WARP policy θ_slerp^{config.iterations}" if config.method == "warp" else "REINFORCE baseline policy"
    print(f"{what} → {final} (load with AutoModelForCausalLM.from_pretrained)")
    if config.method == "warp":
        _push(config, out, "End of training")
    return 0


def _push(config: WarpConfig, out: Path, message: str) -> None:
    """With `push_to_hub`, final/ to the hub (`stages.hub.push_final`), said in one line."""
    from warp_rlhf.stages.hub import push_final

    url = push_final(config, out, message) if config.push_to_hub else None
    if url:
        print(f"final/ pushed → {url}")


def _evaluate(config: WarpConfig, args: argparse.Namespace) -> int:
    from warp_rlhf.stages.pipeline import evaluate_stage, prepare_output

    if args.overwrite:
        raise ConfigError("evaluate reads what the folder holds: --overwrite would delete it first")
    out = prepare_output(config, overwrite=args.overwrite, config_file=args.config)
    results = evaluate_stage(config, out)
    print(results_table(results["policies"], config_to_dict(config)))
    if "matched_kl" in results:
        print(matched_line(results["matched_kl"]))
    print(f"results, completions and plots → {OutputDir(out).eval}; report → {OutputDir(out).report}")
    _push(config, out, "Evaluation results")  # final/'s card now holds them
    return 0


def matched_line(matched: dict) -> str:
    """A − B at matched KL (`compare`), each difference ± s.e., and the verdict, in one line."""
    from warp_rlhf.stages.plots import number

    cells = ", ".join(f"{d['difference']:+.3f} ± {d['se']:.3f} at KL {number(d['kl'])}" for d in matched["differences"])
    return f"{matched['a']} − {matched['b']}, reward at matched KL: {cells} ({matched['verdict']})"


def results_table(policies: dict, settings: dict | None = None) -> str:
    """SFT, WARP and the baseline's last point as an aligned text table, and a line saying so when a
    trained policy did not move from SFT (`report.unmoved_note`; `settings`: the config's values)."""
    from warp_rlhf.stages.compare import Difference
    from warp_rlhf.stages.plots import cell
    from warp_rlhf.stages.report import unmoved_note

    rows = [name for name in policies if policies[name]["kind"] in {"sft"} or name == "warp"]
    baseline = [name for name in policies if policies[name]["kind"] == "reinforce"]
    rows += baseline[-1:]
    lines = [f"{'policy':<16}{'reward':>16}{'judge':>16}{'KL exact':>16}{'KL k1':>16}"]
    for name in rows:
        p = policies[name]
        cells = [cell(p, m) for m in ("reward", "judge", "kl_exact", "kl_k1")]
        lines.append(f"{name:<16}" + "".join(f"{c:>16}" for c in cells))
    if "sft" in policies and "warp" in policies:
        sft, warp = policies["sft"], policies["warp"]
        gap, se = warp["reward_mean"] - sft["reward_mean"], (warp["reward_se"] ** 2 + sft["reward_se"] ** 2) ** 0.5
        lines.append(f"WARP − SFT reward: {gap:.3f} ± {se:.3f} ({Difference(0.0, gap, se).z:.1f} standard errors)")
    unmoved = unmoved_note(policies, settings or {})
    return "\n".join([*lines, unmoved] if unmoved else lines)


def _run(config: WarpConfig, args: argparse.Namespace) -> int:
    """reward → WARP → the REINFORCE baseline → evaluate, all in one output folder."""
    import dataclasses

    _reward(config, args)
    resumed = argparse.Namespace(**{**vars(args), "resume": True, "overwrite": False})
    _train(dataclasses.replace(config, method="warp"), resumed)
    _train(dataclasses.replace(config, method="reinforce"), resumed)
    return _evaluate(config, resumed)


def _demo(config: WarpConfig, args: argparse.Namespace) -> int:
    print("warp-rlhf demo: reward model → WARP → REINFORCE baseline → evaluation", file=sys.stderr)
    return _run(config, argparse.Namespace(**{**vars(args), "resume": True}))


def _sweep(config: WarpConfig, args: argparse.Namespace) -> int:
    from warp_rlhf.stages.sweep import run_sweep

    values = [v.strip() for v in args.values.split(",") if v.strip()]
    rows = run_sweep(config, args.param, values, overwrite=args.overwrite, config_file=args.config)
    for row in rows:
        print(
            f"{args.param}={row['value']:<10} reward {row['reward_mean']:.3f} ± {row['reward_se']:.3f}   "
            f"KL {row['kl_exact_mean']:.3f} ± {row['kl_exact_se']:.3f}"
        )
    print(f"summary, plots and report → {config.output_dir}/sweep, {config.output_dir}/report.md")
    return 0


def _experiment(args: argparse.Namespace, extra: list[str]) -> int:
    """Run an experiment file (`stages.experiment`); it takes no config flags."""
    from warp_rlhf.config import read_yaml
    from warp_rlhf.cpu import keep_freed_memory
    from warp_rlhf.stages import experiment as paper
    from warp_rlhf.stages import warm_experiment as warm
    from warp_rlhf.stages.output import OutputLock

    if args.config is None:
        raise ConfigError("experiment needs --config FILE (for example experiments/paper.yaml)")
    if _overrides(args, extra) or args.overwrite or args.resume:
        raise ConfigError("experiment takes its settings from its file and always resumes: no flags but --config")
    kind = read_yaml(args.config).get("experiment", "paper")
    if kind not in ("paper", "warm"):
        raise ConfigError(f"experiment file {args.config}: experiment={kind!r} is not one of paper, warm")
    experiment = warm.WarmExperiment.load(args.config) if kind == "warm" else paper.Experiment.load(args.config)
    run, table = (
        (warm.run_warm_experiment, warm.claims_table) if kind == "warm" else (paper.run_experiment, paper.claims_table)
    )
    keep_freed_memory()
    with OutputLock(experiment.root.root):
        results = run(experiment)
    print(table(results))
    print(f"results and figures → {experiment.report_dir}")
    return 0


def _compare(args: argparse.Namespace, extra: list[str]) -> int:
    """Compare evaluated output folders (`stages.compare_runs`); it reads them and writes only to --output_dir."""
    from warp_rlhf.stages.compare_runs import compare_runs, write_comparison

    if extra:
        raise ConfigError(f"compare takes output folders and --output_dir only, not '{extra[0]}'")
    results = compare_runs([Path(run) for run in args.runs])
    write_comparison(results, Path(args.output_dir))
    for comparison in results["comparisons"]:
        print(matched_line(comparison))
    print(f"figure and tables → {Path(args.output_dir) / 'reward_vs_kl.png'}, {Path(args.output_dir) / 'compare.md'}")
    return 0


def _plan(config: WarpConfig, args: argparse.Namespace) -> int:
    """Print the memory plan of `config` (`stages.plan`); it reads config files only."""
    from warp_rlhf.stages.plan import plan, plan_text

    if args.overwrite:
        raise ConfigError("plan writes nothing: --overwrite does not apply")
    print(plan_text(plan(config)))
    return 0


HANDLERS: dict[str, Callable[[WarpConfig, argparse.Namespace], int]] = {
    "reward": _reward,
    "train": _train,
    "evaluate": _evaluate,
    "run": _run,
    "demo": _demo,
    "sweep": _sweep,
}


class _Stderr(logging.Handler):
    """`warp-rlhf: message` on the current `sys.stderr` (looked up at each record, not once)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warp-rlhf: {record.getMessage()}", file=sys.stderr)


def _log_to_stderr() -> None:
    """The library's notes (`warp_rlhf` logger, warnings and up) reach the user of the command."""
    logger = logging.getLogger("warp_rlhf")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        logger.addHandler(_Stderr(logging.WARNING))
        logger.propagate = False


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that every `finally` runs (runs side by side stop)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _log_to_stderr()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    out, before = None, None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "experiment":
            return _experiment(args, extra)
        if args.command == "compare":
            return _compare(args, extra)
        config = load_config(args.config, _overrides(args, extra), demo=args.command == "demo", resume=args.resume)
        if args.command == "plan":
            return _plan(config, args)
        out = Path(config.output_dir)
        from warp_rlhf.cpu import keep_freed_memory
        from warp_rlhf.stages.output import owned, progress_summary

        keep_freed_memory()  # a process-wide allocator setting: made here, at the edge
        before = progress_summary(out)
        with owned(out):
            return HANDLERS[args.command](config, args)
    except WarpError as error:
        _release()
        _fail(str(error) + _kept(out, before, args))
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        _release()
        _fail(_write_error(error) + _kept(out, None, args))
    except (KeyboardInterrupt, Terminated) as stop:
        _release()
        what = "interrupted (Ctrl-C)" if isinstance(stop, KeyboardInterrupt) else "stopped (SIGTERM)"
        print(f"warp-rlhf: {what} during `{args.command}`{_kept(out, None, args)}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(stop, KeyboardInterrupt) else EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_USAGE


def _release() -> None:
    """Stop what the command started (a local Ray instance) before its last line is printed."""
    if "warp_rlhf.runners" in sys.modules:
        sys.modules["warp_rlhf.runners"].release()


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
"""Errors of the file system (full, read-only, not permitted), not of the program: one line naming
the file, like any bad input."""


def _write_error(error: OSError) -> str:
    from warp_rlhf.checkpoint import written_name

    path = f" {written_name(error.filename)}" if error.filename else ""
    if error.errno in {errno.ENOSPC, errno.EDQUOT}:
        return f"no space left on the device{' writing' + path if path else ''}"
    return f"cannot access{path or ' a file'}: {error.strerror or error}"


def _kept(out: Path | None, before: str | None, args: argparse.Namespace) -> str:
    """Where the finished work is and how to go on, when the command got that far (its progress
    is not what it was when it started, `before`): the command with `--resume`, which reads the
    config saved in the folder, so no other flag is needed."""
    from warp_rlhf.stages.output import has_progress, progress_summary

    if out is None or not out.is_dir() or not has_progress(out) or progress_summary(out) == before:
        return ""
    swept = f" --param {args.param} --values {shlex.quote(args.values)}" if args.command == "sweep" else ""
    again = f"warp-rlhf {args.command} --output_dir {shlex.quote(str(out))}{swept} --resume"
    return f"; kept in {out}: {progress_summary(out)} (continue with `{again}`)"


if __name__ == "__main__":
    sys.exit(main())
