"""experiments/smoke.yaml end to end on the tiny model: the MLflow store a reviewer will browse."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.pipeline import run_pipeline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


def test_run_hierarchy_and_metric_keys(smoke_run):
    cfg, uri, results, _ = smoke_run
    client = _client(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    pipeline = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(pipeline) == 1
    parent_id = pipeline[0].info.run_id
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(stages) == set(cfg.stages)
    assert pipeline[0].data.params["model.name_or_path"] == "tiny-random-llama"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert "config.yaml" in artifacts
    eval_id = stages["evaluate"].info.run_id
    systems = {r.data.tags["system"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == eval_id}
    assert set(systems) == set(cfg.evaluate.systems)
    keys = {"eq_bench/score", "eq_bench/parsed", "emobench_eu/accuracy", "emobench_ea/accuracy", "gsm8k/accuracy",
            "mmlu/accuracy", "xstest/unsafe_compliance_rate", "downstream/judge_score"}
    keys |= {f"mpi/{t}" for t in ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")}
    for name, run in systems.items():
        assert keys <= set(run.data.metrics), f"{name} lacks {keys - set(run.data.metrics)}"
    # the same metric keys in every system run, so MLflow's compare view lines them up
    assert len({frozenset(run.data.metrics) for run in systems.values()}) == 1
    eval_artifacts = {a.path for a in client.list_artifacts(eval_id)}
    assert {"comparison.csv", "comparison.md", "benchmarks_by_system.png", "big_five_by_system.png",
            "comparison_table.json", "vs_baseline.md"} <= eval_artifacts
    for run in systems.values():  # every metric carries its 95% interval, around the point value
        m = run.data.metrics
        assert m["mmlu/accuracy_ci_low"] <= m["mmlu/accuracy"] <= m["mmlu/accuracy_ci_high"]
        assert m["mpi/openness_ci_low"] <= m["mpi/openness"] <= m["mpi/openness_ci_high"]
    pe = systems["expert_agreeableness_high"].data.metrics  # persona_expression: the classifier, and the expert's own pole
    assert 0.0 <= pe["persona_expression/own_pole_rate"] <= 1.0 and pe["persona_expression/pole_comparisons"] == 2
    assert pe["persona_expression/classifier_val_accuracy"] > 0.3  # the MiniLM probe on curated val replies
    assert math.isnan(systems["personafuse"].data.metrics["persona_expression/own_pole_rate"])
    oracle = json.loads((Path(cfg.output_dir) / "evaluate" / "records" / "oracle_gates" / "gates.json").read_text())
    assert any(_is_curated_label(row, cfg) for row in oracle)  # persona_expression's situations get their labels
    table = (Path(cfg.output_dir) / "evaluate" / "vs_baseline.md").read_text()
    assert "| personafuse | mmlu/accuracy |" in table and "excludes 0" in table


def _is_curated_label(row, cfg) -> bool:
    """Whether `row` is some situation's curated label under the configured gate normalisation."""
    import torch

    from datamodules.personas import load_personas
    from datamodules.situations import load_situations
    from lightning_modules.components.router import normalise_gates
    from lightning_modules.evaluate_gates import perfect_logits

    personas = load_personas(cfg.personas.file)
    labels = torch.tensor([personas.label_vector(s.label, s.id) for s in load_situations(cfg.data.situations, personas)])
    gates = normalise_gates(perfect_logits(labels), cfg.router.gate, cfg.router.temperature, cfg.router.top_k)
    poles = torch.tensor(row[: gates.shape[1]])  # rows carry the stacked SFT LoRA's gate (0) after the ten poles
    return bool((gates - poles).abs().max(dim=1).values.min() < 1e-4)


def test_records_rescore_to_logged_metrics(smoke_run):
    from datamodules.benchmarks.stats import bootstrap_intervals
    from lightning_modules.evaluate import build_benchmarks

    cfg, uri, results, tmp = smoke_run
    benchmarks = build_benchmarks(cfg.evaluate, cfg)
    client = _client(uri)
    for system, run_id in results["evaluate"]["systems"].items():
        logged = client.get_run(run_id).data.metrics
        for name, bench in benchmarks.items():
            records = [json.loads(line) for line in (Path(cfg.output_dir) / "evaluate" / "records" / system / f"{name}.jsonl").open()]
            for key, value in bench.score_records(records).items():
                assert logged[key] == pytest.approx(value, nan_ok=True), (system, key)
            ci = bootstrap_intervals(bench.aggregate, records, cfg.evaluate.bootstrap_samples, cfg.evaluate.bootstrap_seed)
            for key, value in ci.items():
                assert logged[key] == pytest.approx(value, nan_ok=True), (system, key)


def test_rerun_skips_every_stage(smoke_run, capsys):
    cfg, uri, results, _ = smoke_run
    again = run_pipeline(cfg)
    assert again["evaluate"]["systems"] == results["evaluate"]["systems"]
    assert len(_client(uri).search_runs([_client(uri).get_experiment_by_name("smoke").experiment_id])) == \
        1 + len(cfg.stages) + len(cfg.evaluate.systems)


def test_router_heatmap_and_adapters_exist(smoke_run):
    cfg, _, results, _ = smoke_run
    out = Path(cfg.output_dir)
    assert (out / "router" / "gates_by_domain.png").stat().st_size > 1000
    for pole in results["adapter_sft"]["experts"]:
        assert (out / "adapter_sft" / "adapters" / pole / "adapter_model.safetensors").stat().st_size > 0


def test_chat_shows_activated_poles(smoke_run):
    import subprocess
    import sys

    cfg, _, _, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "chat", cfg.output_dir, "--max-new-tokens", "4"],
                          input="My cat died today.\n\n", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "poles:" in proc.stdout and "bot>" in proc.stdout
