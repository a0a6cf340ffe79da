"""The `personafuse` command: run pipelines, sweeps, the MLflow UI, chat, benchmark data.

    personafuse run quickstart [key=value ...] [--rerun STAGE]   (or experiments/quickstart.yaml)
    personafuse run paper [key=value ...] --launcher slurm --nodes 2 --gpus-per-node 4 [--dry-run]
    personafuse config [SECTION]
    personafuse reset STAGE experiments/quickstart.yaml [key=value ...]
    personafuse sweep sweeps/smoke_grid.yaml [--launcher local|slurm] [--dry-run]
    personafuse ui
    personafuse export RUN_DIR OUT [--merge]
    personafuse human-eval export RUN_DIR OUT | serve OUT | import OUT
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from datamodules.io import StageFailed
    from datamodules.redaction import redact

    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume")
        return 130
    except _user_errors() as err:
        console.print(f"[bold red]error:[/] {escape(redact(str(err)))}")  # messages quote user text: no markup
        return 2
    except StageFailed as err:
        console.print(f"[bold red]failed:[/] {escape(redact(str(err)))}")
        return 1
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        where = f" while writing {full.filename}" if getattr(full, "filename", None) else ""
        console.print(f"[bold red]error: disk full[/]{where}: {full.strerror or full}. Every finished file was "
                      "written whole (temporary file + rename) and is kept: free space, then rerun the same command to resume.")
        return 3


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _disk_full(err: BaseException):
    """The out-of-space OSError behind `err` (Lightning, MLflow and sqlite wrap it), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        if "database or disk is full" in str(err):  # sqlite reports ENOSPC as SQLITE_FULL
            return OSError(errno.ENOSPC, "database or disk is full (MLflow store)")
        err = err.__cause__ or err.__context__
    return None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: reported in one line, no traceback."""
    from datamodules.io import DataError
    from experiments.config import ConfigError
    from experiments.pipeline import PipelineLocked, RankWaitTimeout

    return (ConfigError, DataError, PipelineLocked, RankWaitTimeout, FileNotFoundError)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personafuse",
        description="PersonaFuse experiment suite: Big Five persona experts + router, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the stages an experiment config lists", description=_RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="experiment YAML, or a shipped config's name: quickstart = experiments/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=3")
    run.add_argument("--print-config", action="store_true", help="print the resolved config (credentials masked) and exit")
    run.add_argument("--plan", action="store_true",
                     help="check the whole config, then say for each stage whether it would skip, resume or run, "
                          "and why; runs and writes nothing")
    run.add_argument("--rerun", metavar="STAGE", default=None,
                     help="redo STAGE and every later stage although they finished under this config "
                          "(their old outputs are kept as <stage>.superseded-<hash>[-N], never replaced)")
    run.add_argument("--launcher", choices=["local", "slurm"], default="local",
                     help="local: run here (default); slurm: submit the pipeline as one SLURM job through submitit, "
                          "requeued at its time limit and resumed")
    run.add_argument("--dry-run", action="store_true",
                     help="with --launcher slurm: print the sbatch parameters, script and command; submit nothing")
    _add_slurm_flags(run)
    run.set_defaults(handler=_cmd_run)

    reset = sub.add_parser("reset", help="set a stage and every later stage aside, so the next run redoes them",
                           description="Move the outputs of STAGE and every later stage of the config to "
                                       "<stage>.superseded-<hash>[-N] (never replacing an earlier copy); the next "
                                       "`personafuse run` redoes them in new MLflow runs. Use it before a launcher "
                                       "that starts every rank (torchrun, srun), where `run --rerun` is refused.")
    reset.add_argument("stage", metavar="STAGE", help="the first stage to redo, e.g. evaluate")
    reset.add_argument("config", help="experiment YAML or shipped config name, e.g. quickstart")
    reset.add_argument("overrides", nargs="*", help="key=value overrides the run uses (output_dir among them)")
    reset.set_defaults(handler=_cmd_reset)

    keys = sub.add_parser("config", help="list every config key with the default in force and its meaning")
    keys.add_argument("section", nargs="?", default="", metavar="SECTION",
                      help="only this section or key, e.g. evaluate, evaluate.judge, trainer.max_steps")
    keys.set_defaults(handler=_cmd_config)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the project's store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument("--tracking-uri", default=None, help="store (default: $MLFLOW_TRACKING_URI or mlruns/mlflow.db)")
    ui.set_defaults(handler=_cmd_ui)

    sweep = sub.add_parser("sweep", help="run many trials of an experiment (grid, random or TPE search)",
                           description=_SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file, e.g. sweeps/smoke_grid.yaml")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file, e.g. launcher.parallel=2")
    sweep.add_argument("--launcher", choices=["local", "slurm"], default=None,
                       help="where trials run (default: the file's launcher.kind)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print every trial's overrides and command (or sbatch script); run and create nothing")
    sweep.set_defaults(handler=_cmd_sweep)

    reg = sub.add_parser("list", help="list registered stages, systems, benchmarks, teachers, launchers")
    reg.set_defaults(handler=_cmd_list)

    chat = sub.add_parser("chat", help="chat in the terminal with a trained PersonaFuse model",
                          description="Interactive chat; each turn shows the poles the router activated.")
    chat.add_argument("source", metavar="RUN_OR_FOLDER",
                      help="a PersonaFuse folder (personafuse.json) or a pipeline output_dir, e.g. outputs/quickstart")
    chat.add_argument("--max-new-tokens", type=int, default=160, help="reply budget (default 160)")
    chat.add_argument("--top", type=int, default=3, help="activated poles shown per turn (default 3)")
    chat.set_defaults(handler=_cmd_chat)

    export = sub.add_parser("export", help="copy a finished run's adapters and router, with a model card, into OUT",
                            description=_EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline output_dir that ran adapter_sft and router")
    export.add_argument("out", metavar="OUT", help="folder to create (must not exist, or be empty)")
    export.add_argument("--merge", action="store_true",
                        help="also write merged/<pole>/ (and merged/sft_baseline/): base + adapter as one plain "
                             "transformers model")
    export.add_argument("--gates", metavar="POLE=W,...", default=None,
                        help="also write merged/gated/: the experts folded into the base under this fixed gate vector "
                             "(e.g. extraversion_high=1,agreeableness_high=0.5; unnamed poles get 0)")
    export.add_argument("--system", metavar="NAME", default=None,
                        help="also write merged/NAME/ for an evaluated system with fixed gates (expert_<pole>)")
    export.set_defaults(handler=_cmd_export)

    lm_eval = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on one system of a finished run "
                             "(needs the lmeval extra)", description=_LM_EVAL_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    lm_eval.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline output_dir, e.g. outputs/quickstart")
    lm_eval.add_argument("--system", default="personafuse", help="an evaluated system (`personafuse list`), "
                         "default personafuse (routed)")
    lm_eval.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    lm_eval.add_argument("--output", help="write lm-eval's results JSON here (atomically)")
    lm_eval.add_argument("--limit", type=float, help="items per task (a fraction below 1); for quick checks only")
    lm_eval.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own)")
    lm_eval.add_argument("--include-path", help="a folder of your own lm-eval task YAMLs")
    lm_eval.add_argument("--batch-size", type=int, help="default: the run's evaluate.batch_size")
    lm_eval.add_argument("--device", help="default: the run's model.device")
    lm_eval.set_defaults(handler=_cmd_lm_eval)
    _add_human_eval(sub)
    return parser


def _add_human_eval(sub) -> None:
    """`personafuse human-eval export|serve|import`: blinded pairs, the rating page, the results."""
    he = sub.add_parser("human-eval", help="human preference evaluation of downstream replies (blinded pairs, "
                                           "a local rating page, win rates and agreement in MLflow)",
                        description=_HUMAN_EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    he_sub = he.add_subparsers(dest="human_eval_command", metavar="SUBCOMMAND", required=True)
    ex = he_sub.add_parser("export", help="write blinded pairs, rater assignments and the unblinding key into OUT")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline output_dir whose evaluate stage judged downstream replies")
    ex.add_argument("out", metavar="OUT", help="study folder to create (must not exist, or be empty)")
    ex.add_argument("--pair", action="append", default=[], metavar="SYSTEM:OTHER",
                    help="compare SYSTEM with OTHER (repeatable; default personafuse against each --external, "
                         "or against base)")
    ex.add_argument("--external", action="append", default=[], metavar="NAME=FILE", type=_key_value("--external"),
                    help="replies from outside the run, JSONL of {situation_id, reply}, usable as NAME in --pair")
    ex.add_argument("--raters", default="2", help="rater count (r1, r2, ...) or names, e.g. alice,bob (default 2)")
    ex.add_argument("--overlap", type=float, default=0.3,
                    help="share of pairs every rater rates, for agreement (default 0.3); the rest is split")
    ex.add_argument("--seed", type=int, default=0, help="seed of the A/B positions and the assignments (default 0)")
    ex.set_defaults(handler=_cmd_human_eval_export)
    sv = he_sub.add_parser("serve", help="serve the rating page on 127.0.0.1")
    sv.add_argument("out", metavar="OUT", help="a study folder written by `human-eval export`")
    sv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    sv.set_defaults(handler=_cmd_human_eval_serve)
    im = he_sub.add_parser("import", help="win/tie/loss rates with intervals and kappa into the evaluate run")
    im.add_argument("out", metavar="OUT", help="a study folder with verdicts")
    im.add_argument("--run-dir", default=None, help="the pipeline output_dir (default: the one the study was exported from)")
    im.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one the pipeline logged to)")
    im.set_defaults(handler=_cmd_human_eval_import)


_NOT_RUN_FLAGS = {"kind", "parallel", "array"}
"""Sweep launcher keys that make no sense for one run; every other key is a `run --launcher slurm` flag."""


def _add_slurm_flags(parser: argparse.ArgumentParser) -> None:
    """`run --launcher slurm` flags: the sweep file's `launcher:` keys under the same names (--gpus-per-node
    is launcher.gpus_per_node), with their docstrings as help, so there is one vocabulary for SLURM jobs."""
    import dataclasses
    import typing

    from experiments.config import _field_docs
    from experiments.sweep.schema import LAUNCHER_MINIMUMS, LauncherSpec

    group = parser.add_argument_group("with --launcher slurm (the keys of a sweep file's launcher: section)")
    docs, hints = _field_docs(LauncherSpec), typing.get_type_hints(LauncherSpec)
    for field in dataclasses.fields(LauncherSpec):
        if field.name in _NOT_RUN_FLAGS:
            continue
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        kwargs = {"help": docs.get(field.name, "").replace("slurm: ", "").replace("%", "%%"), "default": None}
        if hint is bool:
            kwargs.update(action="store_true")
        elif typing.get_origin(hint) is dict:
            kwargs.update(action="append", metavar="KEY=VALUE", type=_key_value(flag))
        elif typing.get_origin(hint) is list:
            kwargs.update(action="append", metavar="LINE")
        else:
            base = next(a for a in typing.get_args(hint) or (hint,) if a is not type(None))
            kwargs.update(type=_at_least(base, LAUNCHER_MINIMUMS.get(field.name), flag), metavar=field.name.upper())
        group.add_argument(flag, **kwargs)


def _at_least(kind: type, low, flag: str):
    """An argparse type: `kind`, and >= low when given, with an error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a {kind.__name__}, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {low}, got {value}")
        return value
    return parse


def _key_value(flag: str):
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{flag} takes KEY=VALUE (e.g. {flag} qos=high), got {text!r}")
        return key, value
    return parse


_RUN_HELP = """Run an experiment: resolve the config (schema <- YAML <- key=value overrides),
then run each stage in `stages` as an MLflow child run of one pipeline run.

Rerunning the same command skips finished stages whose config is unchanged and
resumes interrupted ones; `--rerun STAGE` redoes STAGE and every later stage
anyway (after a code change, say).

CONFIG is a YAML path or a shipped config's name (quickstart, smoke, paper, ...).

--launcher slurm submits the run as one SLURM job (one task per GPU), requeued
at its time limit and resumed; its flags are a sweep file's launcher keys.
Put key=value overrides before the flags.

Every key with the default in force and its meaning: `personafuse config`;
one section: `personafuse config SECTION` (e.g. `personafuse config evaluate.judge`)."""


_SWEEP_HELP = """Run a sweep: one `personafuse run` per trial of a base experiment, each trial's
pipeline run a child of one MLflow sweep run (experiment = the sweep's name).

The sweep file lists: base (experiment YAML), overrides (shared key=value),
parameters (key -> list of values for a grid; or method: random|tpe, trials: N,
seed, key -> {low, high, log} or {choices: [...]}), objective (an MLflow metric,
direction maximize|minimize, optional stage), launcher (kind local|slurm,
parallel; slurm: partition, nodes, gpus_per_node, cpus_per_task, time_min,
account, mem_gb, extra_sbatch, setup, array).

Relaunching the same command skips finished trials and reruns failed ones.
At the end the trials are ranked by the objective (printed, trials.csv/.md).
Exit status: 0 when every trial finished, 1 when some failed."""


def _cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep import SweepLocked, load_sweep, run_sweep

    sweep = load_sweep(args.sweep_file, args.overrides, args.launcher)
    try:
        return run_sweep(sweep, dry_run=args.dry_run)
    except SweepLocked as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from experiments.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    if args.launcher == "slurm" and not args.plan:
        return _submit_slurm(args)
    given = [f"--{f.replace('_', '-')}" for f in _slurm_flag_values(args)]
    if args.launcher != "slurm" and (args.dry_run or given):
        from experiments.config import ConfigError

        raise ConfigError(f"{' '.join(given) or '--dry-run'} applies to --launcher slurm only")
    from experiments.pipeline import plan, run_pipeline
    from experiments.validation import preflight

    if args.plan:
        preflight(cfg)
        for step in plan(cfg, args.rerun):
            print(f"{step.stage:<13} {step.action:<7} {step.why}")
        return 0
    # A scheduler's SIGTERM (SLURM preemption, `kill`) ends the run like Ctrl-C: runs KILLED, resumable.
    signal.signal(signal.SIGTERM, _interrupt)
    run_pipeline(cfg, rerun=args.rerun)
    return 0


def _slurm_flag_values(args: argparse.Namespace) -> dict:
    """The SLURM flags given on the command line, by launcher key."""
    from experiments.sweep.schema import LauncherSpec

    names = [f.name for f in __import__("dataclasses").fields(LauncherSpec) if f.name not in _NOT_RUN_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _submit_slurm(args: argparse.Namespace) -> int:
    """`run --launcher slurm`: the pipeline as one checkpointable SLURM job (or, with --dry-run, its preview)."""
    from experiments.config import ConfigError
    from experiments.slurm import submit_pipeline
    from experiments.sweep.schema import LauncherSpec

    if args.rerun:
        raise ConfigError(f"--rerun with --launcher slurm: run `personafuse reset {args.rerun} {args.config} ...` "
                          "here first, then submit (every task of the job would see the old results)")
    values = _slurm_flag_values(args)
    if "extra_sbatch" in values:
        values["extra_sbatch"] = dict(values["extra_sbatch"])
    submit_pipeline(args.config, args.overrides, LauncherSpec(kind="slurm", **values), dry_run=args.dry_run)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_reset(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from experiments.pipeline import reset_stages

    cfg = load_config(args.config, args.overrides)
    moved = reset_stages(cfg, args.stage)
    if not moved:
        console.print(f"nothing to reset: no stage from '{args.stage}' on has run in {cfg.output_dir}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from experiments.config import help_text

    print(help_text(args.section))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from experiments import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    import mlflow

    for exp in mlflow.MlflowClient(uri).search_experiments():
        console.print(f"{exp.name}: {tracking.runs_url(exp.experiment_id, args.host, args.port)}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    root = tracking.artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    console.print(f"serving {uri} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd, env=os.environ.copy())


def _cmd_chat(args: argparse.Namespace) -> int:
    from experiments.chat import chat_loop

    return chat_loop(args.source, args.max_new_tokens, args.top)


_EXPORT_HELP = """Export a finished run as standard artifacts: OUT/adapters/<pole>/ (PEFT LoRA
adapters naming a loadable base), OUT/router/, OUT/sft_baseline/ (when trained),
OUT/personafuse.json (`personafuse chat OUT`) and a README.md model card.
--merge adds OUT/merged/<name>/: the base with that adapter merged in, which
transformers' AutoModelForCausalLM loads without peft.

OUT is written in a temporary folder and renamed at the end: never half-written."""


def _cmd_export(args: argparse.Namespace) -> int:
    from experiments.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge, gates=args.gates, system=args.system)
    console.print(f"[bold green]exported[/] {args.run_dir} to {out} (model card: {out / 'README.md'})")
    return 0


_LM_EVAL_HELP = """Run lm-evaluation-harness tasks on one evaluated system of a finished run, built
as the evaluate stage builds it (the router picks gates per request). Contexts are
rendered with the model's chat template, as the built-in benchmarks render them.

    personafuse lm-eval outputs/quickstart --system base --tasks mmlu_abstract_algebra --limit 20 --output lm_eval/base.json

--output is the results JSON lm-eval writes. For every lm-eval flag use its own CLI:
python -m experiments.lm_eval_bridge --model personafuse --model_args run=RUN_DIR,system=NAME --apply_chat_template ..."""


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from experiments.lm_eval_bridge import evaluate_tasks
    from lm_eval.utils import make_table

    results = evaluate_tasks(args.run_dir, args.system, args.tasks.split(","), args.output, args.limit,
                             args.num_fewshot, args.include_path, args.batch_size, args.device)
    print(make_table(results))
    if args.output:
        console.print(f"[bold green]results[/] in {args.output}")
    return 0


_HUMAN_EVAL_HELP = """Human preference evaluation of the evaluate stage's downstream replies.

  export RUN_DIR OUT   blinded pairs (OUT/pairs.jsonl, no system names), per-rater
                       assignments that overlap (OUT/assignments.json), and the
                       unblinding key kept apart (OUT/key.json: do not give it to raters)
  serve OUT            the rating page on http://127.0.0.1:8765/?rater=NAME: one pair
                       at a time, keys a / b / t, c for a comment; every verdict is
                       saved at once (OUT/verdicts/NAME.jsonl), so raters can resume
  import OUT           win/tie/loss rates per comparison with 95% bootstrap intervals,
                       and Cohen's (2 raters) or Fleiss' kappa on the overlap, logged to
                       the evaluate run (metrics, comparison table, human_eval.png)"""


def _cmd_human_eval_export(args: argparse.Namespace) -> int:
    from experiments.human_eval.study import export_study

    out = export_study(args.run_dir, args.out, args.pair, dict(args.external), args.raters, args.overlap, args.seed)
    console.print(f"[bold green]exported[/] pairs to {out}; keep {out / 'key.json'} from raters. "
                  f"Next: personafuse human-eval serve {out}")
    return 0


def _cmd_human_eval_serve(args: argparse.Namespace) -> int:
    from experiments.human_eval.server import serve

    serve(args.out, args.port)
    return 0


def _cmd_human_eval_import(args: argparse.Namespace) -> int:
    from experiments.human_eval.report import import_study
    from experiments.human_eval.results import markdown

    result = import_study(args.out, args.run_dir, args.tracking_uri)
    print(markdown(result["comparisons"], result["agreement"]))
    console.print(f"logged to MLflow run {result['run_id']} (human_eval.md, human_eval.png, comparison table)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from experiments import registry

    for reg in (registry.STAGES, registry.SYSTEMS, registry.BENCHMARKS, registry.TEACHERS,
                registry.LAUNCHERS, registry.STRATEGIES, registry.ENCODERS, registry.GATES):
        print(f"{reg.kind}s:")
        for name, doc in reg.describe().items():
            print(f"  {name:<22} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
