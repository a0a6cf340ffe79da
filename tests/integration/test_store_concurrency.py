"""Two processes logging to the same sqlite MLflow store at once both complete with all metrics."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import sys
from experiments import tracking
uri, name = sys.argv[1], sys.argv[2]
exp = tracking.get_or_create_experiment("concurrency", uri)
run = tracking.start_run(uri, exp, name, {"stage": "test"})
import mlflow
client = mlflow.MlflowClient(uri)
for step in range(60):
    client.log_metric(run, "loss", 1.0 / (step + 1), step=step)
tracking.log_params(uri, run, {f"p{i}": str(i) for i in range(150)})
client.set_terminated(run, "FINISHED")
print(run)
"""


def test_two_writers_share_one_store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, f"writer{i}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    client = mlflow.MlflowClient(uri)
    for out in outs:
        run_id = out[0].strip().splitlines()[-1]
        history = client.get_metric_history(run_id, "loss")
        assert len(history) == 60
        assert len(client.get_run(run_id).data.params) == 150
