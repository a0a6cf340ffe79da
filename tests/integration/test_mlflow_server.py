"""What a reviewer sees in the MLflow UI, read back through a real `mlflow server`'s REST API.

The cheapest real pipeline (evaluate alone, base and prompting systems, five MPI items, on the
tiny model) runs through the CLI against the server; the assertions query /api/2.0/mlflow/ as the
UI does, not the client objects that wrote the runs.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (tmp / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


def _runs(url: str, experiment_id: str) -> list[dict]:
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 1000}).encode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["runs"]


def _kv(items: list[dict] | None) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items or []}


@pytest.fixture(scope="module")
def evaluated(server, tmp_path_factory):
    """`personafuse run reviewers.yaml` (evaluate alone) against the server: its experiment and runs, as served."""
    tmp = tmp_path_factory.mktemp("eval_out")
    config = tmp / "reviewers.yaml"
    config.write_text("stages: [evaluate]\nmodel: {name_or_path: tiny-random-llama}\n"
                      "evaluate:\n  systems: [base, prompting]\n  judge: {enabled: false}\n"
                      "  benchmarks: {mpi: {limit: 5}}\n  bootstrap_samples: 20\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", str(config), f"output_dir={tmp / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = _get(server, "experiments/get-by-name", experiment_name="reviewers")["experiment"]
    runs = {_kv(r["data"].get("tags")).get("mlflow.runName"): r for r in _runs(server, exp["experiment_id"])}
    return exp, runs


def test_experiment_opens_on_the_training_runs_table(evaluated):
    exp, _ = evaluated
    assert _kv(exp.get("tags"))["mlflow.experimentKind"] == "custom_model_development"


def test_every_run_has_user_source_and_commit(evaluated):
    _, runs = evaluated
    assert set(runs) == {"reviewers", "evaluate", "evaluate:base", "evaluate:prompting"}
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for run in runs.values():
        tags = _kv(run["data"].get("tags"))
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"].endswith("reviewers.yaml")  # the UI shows the part after the last '/'
        assert tags["personafuse.command"].startswith("personafuse run ") and "reviewers.yaml output_dir=" in tags["personafuse.command"]
        assert tags["mlflow.source.git.commit"] == sha


def test_stage_and_system_runs_carry_their_params(evaluated):
    _, runs = evaluated
    stage = _kv(runs["evaluate"]["data"].get("params"))
    assert stage["evaluate.systems"] == '["base", "prompting"]' and stage["model.name_or_path"] == "tiny-random-llama"
    assert not any(k.startswith(("tracking.", "datagen.teacher.base_url", "router.")) for k in stage)  # only what it reads
    base, prompting = (_kv(runs[f"evaluate:{s}"]["data"].get("params")) for s in ("base", "prompting"))
    assert base["system"] == "base" and base["system.persona_prompt"] == "False"
    assert prompting["system.persona_prompt"] == "True" and prompting["system.gates"] == "None"


def test_descriptions_summarise_the_results(evaluated):
    _, runs = evaluated
    notes = {name: _kv(run["data"].get("tags")).get("mlflow.note.content", "") for name, run in runs.items()}
    assert notes["reviewers"].startswith("**reviewers** on `tiny-random-llama`: evaluate.")
    assert "| system | mpi/openness" in notes["reviewers"] and "| prompting |" in notes["reviewers"]
    assert notes["evaluate:prompting"].startswith("**prompting**: direct persona prompting")
    assert "- mpi/openness: " in notes["evaluate:prompting"]


def test_comparison_table_is_a_logged_table(server, evaluated):
    _, runs = evaluated
    run = runs["evaluate"]
    tags = _kv(run["data"].get("tags"))
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "comparison_table.json", "type": "table"}]
    run_id = run["info"]["run_id"]
    with urllib.request.urlopen(f"{server}/get-artifact?path=comparison_table.json&run_uuid={run_id}", timeout=30) as resp:
        table = json.loads(resp.read())
    assert table["columns"][0] == "system" and sorted(row[0] for row in table["data"]) == ["base", "prompting"]


def test_an_existing_experiment_gets_its_kind_once(server):
    """A store made before the tag existed is fixed on the next run; a kind someone chose stays."""
    import mlflow

    from experiments.tracking import get_or_create_experiment

    client = mlflow.MlflowClient(server)
    old = client.create_experiment("made_before")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert get_or_create_experiment("made_before", server) == old
    get_or_create_experiment("chosen", server)
    kinds = {e: _kv(_get(server, "experiments/get", experiment_id=e)["experiment"].get("tags"))["mlflow.experimentKind"]
             for e in (old, chosen)}
    assert kinds == {old: "custom_model_development", chosen: "genai_development"}
