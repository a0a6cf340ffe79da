"""`personafuse export RUN_DIR OUT [--merge]` on a small real run: adapter_sft, sft_baseline and router on
the tiny random Llama (about 30 s), at a learning rate high enough that every adapter changes greedy output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
POLE = "extraversion_high"
PROMPT = [{"role": "user", "content": "My team just won the regional final and I can't stop smiling!"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "situations.jsonl"
    corpus.write_text("".join((ROOT / "datamodules/data/situations.jsonl").read_text().splitlines(keepends=True)[:80]))
    cfg = load_config(ROOT / "experiments/smoke.yaml", [
        "stages=[adapter_sft,sft_baseline,router]", "trainer.max_steps=2", "adapter_sft.lr=0.05", "router.max_epochs=2",
        f"data.situations={corpus}", f"output_dir={tmp / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])
    run_pipeline(cfg)
    return tmp / "out"


def greedy(model, tokenizer, n: int = 12) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_merged_models_generate_what_base_plus_adapter_generates(run_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), str(out), "--merge"]) == 0
    card = (out / "README.md").read_text()
    config = json.loads((out / "adapters" / POLE / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    assert Path(base_path).is_dir() and f"**Base model**: `{base_path}`" in card  # a loadable folder, not the alias
    experts = json.loads((out / "personafuse.json").read_text())["experts"]
    assert len(experts) == 10 and set(experts) == {p.name for p in (out / "adapters").iterdir()}
    assert {p.name for p in (out / "merged").iterdir()} == {*experts, "sft_baseline"}
    assert (out / "router" / "router.safetensors").is_file() and (out / "sft_baseline" / "adapter_model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out / "merged" / POLE)
    base_tokens = greedy(AutoModelForCausalLM.from_pretrained(base_path), tokenizer)
    for name, adapter in ((POLE, out / "adapters" / POLE), ("sft_baseline", out / "sft_baseline")):
        merged = AutoModelForCausalLM.from_pretrained(out / "merged" / name)
        assert not any("lora" in key for key in merged.state_dict())  # plain weights: no peft needed to load
        expected = greedy(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter), tokenizer)
        assert greedy(merged, tokenizer) == expected, name
        assert expected != base_tokens, f"{name}: the adapter does not change the output, so the test proves nothing"
    # the adapter alone finds its base (what vLLM and AutoPeftModelForCausalLM rely on)
    assert greedy(AutoPeftModelForCausalLM.from_pretrained(out / "adapters" / POLE), tokenizer) == \
        greedy(AutoModelForCausalLM.from_pretrained(out / "merged" / POLE), tokenizer)
    assert not list(tmp_path.glob(".export.partial-*"))


def test_merged_model_matches_the_routed_model_with_that_pole_gated_on(run_dir, tmp_path):
    """The exported PersonaFuse folder (what `personafuse chat OUT` loads), gates one-hot on POLE, against
    merged/POLE: both below and past the length where generation folds the gates into the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_modules.components.persona_lora import MERGE_PAYS_FROM_TOKENS
    from lightning_modules.components.personafuse import PersonaFuse, generate_with_gates

    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), str(out), "--merge"]) == 0
    fuse = PersonaFuse.load(out)
    gates = torch.zeros(1, len(fuse.persona_model.expert_names))
    gates[0, fuse.persona_model.expert_names.index(POLE)] = 1.0
    merged, tokenizer = AutoModelForCausalLM.from_pretrained(out / "merged" / POLE), AutoTokenizer.from_pretrained(out / "merged" / POLE)
    for n in (8, MERGE_PAYS_FROM_TOKENS):
        routed = generate_with_gates(fuse.persona_model, fuse.tokenizer, [PROMPT], gates, n)
        assert generate_with_gates(merged, tokenizer, [PROMPT], None, n) == routed and routed[0]


def test_a_fixed_gate_vector_merges_into_what_the_routed_model_generates(run_dir, tmp_path):
    """--gates: two experts at once, one at half weight; the plain model against the routed model (unmerged
    fused path at 8 tokens, merged path past MERGE_PAYS_FROM_TOKENS) under the same gates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_modules.components.persona_lora import MERGE_PAYS_FROM_TOKENS
    from lightning_modules.components.personafuse import PersonaFuse, generate_with_gates

    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), str(out), "--gates", f"{POLE}=1,agreeableness_high=0.5"]) == 0
    folder = out / "merged" / "gated"
    written = json.loads((folder / "gates.json").read_text())
    assert written[POLE] == 1.0 and written["agreeableness_high"] == 0.5 and sum(written.values()) == 1.5
    fuse = PersonaFuse.load(out)
    names = fuse.persona_model.expert_names
    gates = torch.tensor([[written[n] for n in names]])
    merged, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert not any("lora" in key for key in merged.state_dict())
    one_pole = torch.nn.functional.one_hot(torch.tensor([names.index(POLE)]), len(names)).float()
    for n in (8, MERGE_PAYS_FROM_TOKENS):
        routed = generate_with_gates(fuse.persona_model, fuse.tokenizer, [PROMPT], gates, n)
        assert generate_with_gates(merged, tokenizer, [PROMPT], None, n) == routed and routed[0]
    # the second expert matters, so the comparison above could fail
    assert generate_with_gates(fuse.persona_model, fuse.tokenizer, [PROMPT], one_pole, 8) != \
        generate_with_gates(merged, tokenizer, [PROMPT], None, 8)


def test_a_fixed_gate_system_merges_and_a_routed_one_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), str(out), "--system", f"expert_{POLE}"]) == 0
    assert json.loads((out / "merged" / f"expert_{POLE}" / "gates.json").read_text())[POLE] == 1.0
    for system, why in (("personafuse", "depend on each conversation"), ("prompting", "persona prompt is text"),
                        ("expert_extraversion_hi", "did you mean")):
        assert cli.main(["export", str(run_dir), str(tmp_path / system), "--system", system]) == 2
        assert why in capsys.readouterr().err.replace("\n", "")
    for spec, why in (("extraversion_hgh=1", "not an expert of this run"), (f"{POLE}=x", "needs a number"),
                      (f"{POLE}=0", "every gate is 0")):
        assert cli.main(["export", str(run_dir), str(tmp_path / "bad"), "--gates", spec]) == 2
        assert why in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "personafuse").exists()


def test_incomplete_run_dir_names_what_is_missing_and_writes_nothing(run_dir, tmp_path, capsys):
    partial = tmp_path / "run"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("checkpoints", "*.superseded-*"))
    state = partial / "router" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "complete": False}))  # killed mid-router
    out = tmp_path / "export"
    assert cli.main(["export", str(partial), str(out)]) == 2
    assert f"{state}: stage router has not finished" in capsys.readouterr().err.replace("\n", "")

    state.write_text(json.dumps({**json.loads(state.read_text()), "complete": True}))
    (partial / "adapter_sft" / "adapters" / POLE / "adapter_model.safetensors").unlink()
    assert cli.main(["export", str(partial), str(out)]) == 2
    assert f"missing {partial / 'adapter_sft' / 'adapters' / POLE / 'adapter_model.safetensors'}" in \
        capsys.readouterr().err.replace("\n", "")
    assert cli.main(["export", str(tmp_path / "nowhere"), str(out)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no OUT, no temporary folder


def test_export_never_overwrites_and_a_kill_leaves_no_out(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert cli.main(["export", str(run_dir), str(taken)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err and (taken / "mine.txt").read_text() == "keep"

    out = tmp_path / "export"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "export", str(run_dir), str(out), "--merge"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".export.partial-*/merged/*")):  # mid-way: some models merged, not all
        assert proc.poll() is None and time.time() < deadline, "the export ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
