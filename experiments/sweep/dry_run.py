"""`personafuse sweep --dry-run`: every trial's overrides and exact command / sbatch script; nothing is created."""
from __future__ import annotations


from datamodules.redaction import redact
from experiments import tracking
from experiments.config import ConfigError, load_config
from experiments.sweep.plans import FixedPlan, TPEPlan, sampled_params
from experiments.sweep.schema import Sweep
from experiments.sweep.trials import build_trial, trial_env


def dry_run_text(sweep: Sweep, plan, launcher) -> str:
    """Every trial's overrides and exact command / sbatch script; nothing is created."""
    spec = sweep.spec
    trials = plan.trials if isinstance(plan, FixedPlan) else [build_trial(sweep, p, launcher.trial_overrides())
                                                            for p in sampled_params(sweep, min(plan.total, spec.startup_trials))]
    env = trial_env("<sweep-run-id>", display_uri(sweep))
    head = [f"sweep {sweep.name}: {spec.method} over {', '.join(p.key for p in sweep.params)} — {plan.total} trial(s)",
            f"base {spec.base}; MLflow experiment '{sweep.name}' on {env['MLFLOW_TRACKING_URI']}; output {sweep.folder}",
            f"objective: {spec.objective.direction} {spec.objective.metric}" + (f" (stage {spec.objective.stage})" if spec.objective.stage else "")]
    if isinstance(plan, TPEPlan):
        head.append(f"tpe: the first {len(trials)} trial(s) below come from the seeded sampler; later ones depend on results")
    tail = "dry run: nothing submitted, no folder or MLflow run created"
    return redact("\n".join(head + ["", launcher.preview(trials, env), "", tail]))  # commands quote overrides


def display_uri(sweep: Sweep) -> str:
    """The store trials would log to, without creating it."""
    try:
        configured = load_config(sweep.base_path, sweep.spec.overrides).tracking.tracking_uri
    except ConfigError:
        configured = None
    return tracking.planned_uri(configured)
