"""MLflow plumbing: the store, experiments, parent/child runs, params and tags.

Default store: sqlite:///mlruns/mlflow.db (MLflow 3 refuses the old folder store, and Lightning's
MLFlowLogger falls back to it when given no URI, so a URI is always passed explicitly).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from datamodules.io import file_lock
from datamodules.redaction import is_secret_key, redact


def resolve_tracking_uri(configured: Optional[str] = None) -> str:
    """config -> $MLFLOW_TRACKING_URI -> sqlite store under ./mlruns (absolute, so subprocesses agree)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path("mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> Optional[str]:
    """Artifacts next to a local sqlite store (mlruns/artifacts); a server decides its own."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts")
    return None


def ensure_store(tracking_uri: str) -> None:
    """Create a new sqlite store under a file lock: MLflow's schema migration is not safe when two
    processes create the same store at once (alembic 'expected to match one row'). Once created,
    concurrent writers are fine."""
    import mlflow

    if not tracking_uri.startswith("sqlite:///"):
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    with file_lock(db.parent / f".{db.name}.init.lock"):
        mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)


def get_or_create_experiment(name: str, tracking_uri: str) -> str:
    """The experiment id for `name`, creating it with artifacts beside the store."""
    import mlflow

    ensure_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    root = artifact_root(tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # a concurrent process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: Optional[str] = None,
) -> str:
    """Create a (child) run and return its id; the caller logs through MlflowClient."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient(tracking_uri)
    all_tags = redact(dict(tags))
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def reopen_run(uri: str, exp_id: str, run_id: str) -> bool:
    """Mark an interrupted run RUNNING again; False when the store no longer holds it (the store
    was deleted, or tracking points elsewhere now), so the caller starts a fresh run instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        print(f"MLflow run {run_id} is not in {uri} any more; starting a new run", file=sys.stderr)
        return False
    if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def redact_params(params: dict[str, str]) -> dict[str, str]:
    """Values of secret-looking keys dropped (config never holds keys: a second fence), and every
    value redacted (URL credentials, values from the environment)."""
    return {k: ("<redacted>" if is_secret_key(k) else redact(v)) for k, v in params.items()}


def end_run_tree(uri: str, exp_id: str, root: str, status: str) -> None:
    """Mark `root` and every descendant that did not finish (stage runs, per-system runs) as `status`
    (FAILED or KILLED), so MLflow shows what a failure or an interrupt ended; a rerun reopens them.
    A FAILED run is overwritten too: Lightning's MLFlowLogger marks its run FAILED on Ctrl-C."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    todo, seen = [root], set()
    while todo:
        run_id = todo.pop()
        seen.add(run_id)
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
        todo += [c.info.run_id for c in children if c.info.run_id not in seen]
        if client.get_run(run_id).info.status != "FINISHED":
            client.set_terminated(run_id, status)


def log_params(tracking_uri: str, run_id: str, params: dict[str, str]) -> None:
    """Batch-log params (MLflow caps value length at 6000 chars and a batch at 100 params)."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri)
    items = [Param(k, v[:6000]) for k, v in redact_params(params).items()]
    already = client.get_run(run_id).data.params
    items = [p for p in items if p.key not in already]  # a resumed run re-logs nothing
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def git_commit() -> str:
    """The project's git commit (with -dirty when uncommitted changes exist), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def runs_url(experiment_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """MLflow 3 opens experiments on a GenAI page; reviewers want the runs table."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs"
