"""MLflow plumbing: the store, experiments, parent/child runs, params and tags.

Default store: sqlite:///mlruns/mlflow.db (MLflow 3 refuses the old folder store, and Lightning's
MLFlowLogger falls back to it when given no URI, so a URI is always passed explicitly).
"""
from __future__ import annotations

import getpass
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


def planned_uri(configured: Optional[str] = None) -> str:
    """The store a run would log to (config -> $MLFLOW_TRACKING_URI -> ./mlruns), without creating it:
    for dry runs, which must write nothing."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').absolute() / 'mlflow.db'}"


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
        _mark_kind(client, existing)
        return existing.experiment_id
    root = artifact_root(tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # a concurrent process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment of this kind on its training runs table, and one with no kind on
its GenAI page (the values are the UI's ExperimentKind enum, mlflow 3.x server/js)."""


def _mark_kind(client, experiment) -> None:
    """Give an experiment created before this tag existed its kind; a kind someone chose stays."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


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
    all_tags = redact({**standard_tags(), **tags})
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


RUN_KEY_TAG = "personafuse.run_key"


def run_key(*parts: str) -> str:
    """A stable id for "the run of this role" (pipeline folder, stage + hash, system), stored as a tag
    so a run created just before a kill -9 — before its id reached a state file — is found again."""
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def open_run(uri: str, exp_id: str, name: str, tags: dict[str, str], *, key: str,
             parent_run_id: Optional[str] = None, previous: Optional[str] = None) -> str:
    """The run to log into: `previous` (the id a state file recorded) reopened; else the unfinished run
    a killed attempt created under the same `key`; else a new run. Never a duplicate per key."""
    if previous and reopen_run(uri, exp_id, previous):
        return previous
    orphan = _unfinished_run(uri, exp_id, key)
    if orphan and reopen_run(uri, exp_id, orphan):
        return orphan
    return start_run(uri, exp_id, name, {**tags, RUN_KEY_TAG: key}, parent_run_id)


def _unfinished_run(uri: str, exp_id: str, key: str) -> Optional[str]:
    import mlflow

    found = mlflow.MlflowClient(uri).search_runs(
        [exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'", max_results=1,
        order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


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
    sha = git_sha()
    if sha is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if dirty else "")


def git_sha() -> Optional[str]:
    """HEAD of the project's checkout; None outside a git checkout (an installed copy)."""
    return _git("rev-parse", "HEAD") or None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def standard_tags() -> dict[str, str]:
    """MLflow's own run tags, which fill the runs table's User, Source and Version columns (a run
    made through MlflowClient gets none of them, unlike one from mlflow.start_run)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_NAME: source_name()[:5000], COMMAND_TAG: command_line()[:5000],
            MLFLOW_SOURCE_TYPE: "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"}
    sha = git_sha()
    if sha:
        tags[MLFLOW_GIT_COMMIT] = sha
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return "unknown"


COMMAND_TAG = "personafuse.command"
"""The whole command line that made a run (the Source column shows only the config file)."""


def source_name() -> str:
    """What the runs table's Source column shows: the UI keeps the text after the last '/', so a whole
    command line came out as its last argument (e.g. `mlflow.db`). The config file the command ran
    (`quickstart.yaml`) says where a run came from; the full command is in the personafuse.command tag."""
    configs = [a for a in sys.argv[1:] if a.endswith((".yaml", ".yml")) and "=" not in a]
    return configs[0] if configs else " ".join(command_line().split()[:3])  # `personafuse run quickstart`


def command_line() -> str:
    """The command that made the run, as typed (`personafuse run quickstart ...`); redacted when tagged."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog in ("cli.py", "__main__.py") or prog.startswith("personafuse"):
        prog = "personafuse"
    return " ".join([prog, *sys.argv[1:]])


def set_note(tracking_uri: str, run_id: str, text: str) -> None:
    """The run's description (the Description column and the run page's notes), credentials masked."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    mlflow.MlflowClient(tracking_uri).set_tag(run_id, MLFLOW_RUN_NOTE, redact(text)[:8000])


def runs_url(experiment_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """MLflow 3 opens experiments on a GenAI page; reviewers want the runs table."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs"
