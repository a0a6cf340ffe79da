"""Adapter SFT under DDP (2 CPU processes, gloo) trains the same experts as one process with the same
global batch.

Two real differences between the runs are removed by the data, not by a looser tolerance:
- Order. DDP shards each epoch with DistributedSampler (its own permutation of the dataset), while
  one process draws RandomSampler's permutation from the DataModule's generator; the two orders
  differ, so fixed-size batches would differ. Here every optimizer step sees the whole training set
  (per-process batch 10 x 2 processes = 20 examples = 1 process x batch 20), so each step's batch is
  the same set of examples in both runs and the order inside it does not matter.
- Loss normalisation. The SFT loss is a token-weighted mean per process, and DDP averages the
  per-process gradients: that equals one process's mean over all tokens only when both halves hold
  the same number of response tokens. Every record here has the same response (different users and
  poles), so every example has the same number of loss tokens. With uneven lengths DDP weights the
  tokens of the shorter half more; a global token count (all-reduced) in the loss would remove that.

The equivalence test runs `lightning_modules.adapter_sft.run` through `adapter_sft_driver.py` (Lightning
re-executes that script for rank 1), so both runs get the same fresh MLflow run setup. The last
test runs the whole CLI under DDP, where the pipeline's rank awareness matters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, mlflow_uri, tiny_model_path):
    import torch
    from safetensors.torch import load_file

    from adapter_sft_driver import run_stage, write_records

    records = write_records(tmp_path / "records.jsonl")
    common = [f"adapter_sft.data={records}", "adapter_sft.include_persona_examples=false", "lora.dropout=0",
              "lora.r=4", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100", "adapter_sft.lr=0.01"]
    ddp = run_stage(tmp_path, "ddp", mlflow_uri, common + ["trainer.strategy=ddp_cpu", "trainer.devices=2",
                                                           "adapter_sft.batch_size=10"], "ddp_cpu_test")
    single = run_stage(tmp_path, "single", mlflow_uri, common + ["trainer.strategy=auto", "trainer.accelerator=cpu",
                                                                 "trainer.devices=1", "adapter_sft.batch_size=20"], "ddp_cpu_test")
    experts = sorted(p.name for p in single.iterdir())
    assert len(experts) == 10 and sorted(p.name for p in ddp.iterdir()) == experts
    trained = 0.0
    for expert in experts:
        a = load_file(str(ddp / expert / "adapter_model.safetensors"))
        b = load_file(str(single / expert / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{expert}: {key}")
            if ".lora_B." in key:
                trained += float(b[key].abs().sum())
    assert trained > 0  # B starts at zero: the experts really moved
    state = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert state["world_size"] == 2 and state["steps"] == 3


def test_cli_pipeline_under_ddp_two_cpu_processes(tmp_path):
    """`personafuse run … trainer.strategy=ddp_cpu trainer.devices=2` end to end: Lightning starts
    rank 1 by re-running the command when datagen's Trainer starts; rank 1 generates its share of
    the batches and trains, but takes no lock and logs nothing, and waits while rank 0 evaluates, so
    the store holds one pipeline run and one run per stage (and system)."""
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(ROOT / "experiments/smoke.yaml"),
           "stages=[datagen,adapter_sft,router,evaluate]", "trainer.strategy=ddp_cpu", "trainer.devices=2",
           "trainer.max_steps=2", "evaluate.systems=[base,personafuse]", "evaluate.judge.enabled=false",
           f"output_dir={out}", f"tracking.tracking_uri={uri}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in ("datagen", "adapter_sft", "router", "evaluate"):
        assert json.loads((out / stage / "state.json").read_text())["complete"], stage
    assert len(list((out / "adapter_sft" / "adapters").iterdir())) == 10
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["adapter_sft", "datagen", "evaluate", "evaluate", "evaluate",
                                                          "pipeline", "router"]  # evaluate: stage + 2 systems
    assert {r.info.status for r in runs} == {"FINISHED"}
    # --rerun under DDP: rank 0 sets the stages aside before Lightning re-runs the command for rank 1,
    # so rank 1 waits for the new stage states instead of reading the old, finished ones
    before = {s: json.loads((out / s / "state.json").read_text())["run_id"] for s in ("datagen", "router")}
    again = subprocess.run(cmd + ["--rerun", "adapter_sft"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    after = {s: json.loads((out / s / "state.json").read_text()) for s in ("datagen", "adapter_sft", "router", "evaluate")}
    assert after["datagen"]["run_id"] == before["datagen"] and after["router"]["run_id"] != before["router"]
    assert all(state["complete"] for state in after.values())
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs).count("adapter_sft") == 2 and len(runs) == 12
    assert {r.info.status for r in runs} == {"FINISHED"}
