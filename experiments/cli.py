"""The `personafuse` command: run pipelines, sweeps, the MLflow UI, chat, benchmark data.

    personafuse run quickstart [key=value ...] [--rerun STAGE]   (or experiments/quickstart.yaml)
    personafuse config [SECTION]
    personafuse reset STAGE experiments/quickstart.yaml [key=value ...]
    personafuse sweep sweeps/smoke_grid.yaml [--launcher local|slurm] [--dry-run]
    personafuse ui
    personafuse export RUN_DIR OUT [--merge]
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
    return parser


_RUN_HELP = """Run an experiment: resolve the config (schema <- YAML <- key=value overrides),
then run each stage in `stages` as an MLflow child run of one pipeline run.

Rerunning the same command skips finished stages whose config is unchanged and
resumes interrupted ones; `--rerun STAGE` redoes STAGE and every later stage
anyway (after a code change, say).

CONFIG is a YAML path or a shipped config's name (quickstart, smoke, paper, ...).
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
