"""lm-evaluation-harness through the bridge agrees item by item with the built-in MMLU scorer.

A local lm-eval task (a YAML in tmp_path over the shared MMLU CSV, never copied) renders the built-in
scorer's 0-shot prompt; lm-eval runs it on `base` and on routed `personafuse` of a small real run
(adapter_sft + router on the tiny random Llama, about 20 s). About a minute and a half in all.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SUBJECT = "abstract_algebra"
TASK = "pf_mmlu_abstract_algebra"
LIMIT = 20
# The built-in scorer's 0-shot prompt (datamodules/benchmarks/mmlu.py: header + question_block), as a
# task author writes it for lm-eval.
PROMPT = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
          "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer with the letter of the correct option only.")


def data_root() -> Path:
    from datamodules.benchmarks import resolve_data_root

    root = resolve_data_root(None)
    if not (root / "mmlu" / "test" / f"{SUBJECT}_test.csv").is_file():
        pytest.skip(f"MMLU files not found under {root} (../shared/benchmarks or $PERSONAFUSE_BENCHMARKS)")
    return root


def write_task(folder: Path, name: str, prompt: str, **extra) -> Path:
    """A local lm-eval task over the shared MMLU test CSV (no header: the columns are named here)."""
    csv = data_root() / "mmlu" / "test" / f"{SUBJECT}_test.csv"
    task = {"task": name, "dataset_path": "csv", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(csv)}, "cache_dir": str(folder / "hf_datasets"),
                               "column_names": ["question", "A", "B", "C", "D", "answer"]},
            "doc_to_text": prompt, "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}], **extra}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """adapter_sft + router only: everything `base` and `personafuse` need. A high learning rate makes
    the experts move the scores, so routed and base differ."""
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline

    data_root()
    tmp = tmp_path_factory.mktemp("lm_eval_run")
    corpus = tmp / "situations.jsonl"
    corpus.write_text("".join((ROOT / "datamodules/data/situations.jsonl").read_text().splitlines(keepends=True)[:80]))
    cfg = load_config(ROOT / "experiments/smoke.yaml", [
        "stages=[adapter_sft,router]", "trainer.max_steps=2", "adapter_sft.lr=0.05", "router.max_epochs=2",
        f"data.situations={corpus}", f"output_dir={tmp / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])
    run_pipeline(cfg)
    return tmp / "out"


def builtin_records(run_dir: Path, system: str) -> tuple[list[dict], object]:
    """The built-in scorer's records on the first LIMIT items in file order (lm-eval's `limit` takes those)."""
    from datamodules.benchmarks import MMLU
    from experiments.lm_eval_bridge import load_system

    chat = load_system(run_dir, system)
    bench = MMLU(data_root(), k_shot=0, subjects=[SUBJECT])
    records = bench.run_batch(chat, bench.load_items()[:LIMIT])
    return [{**r, **bench.score_record(r)} for r in records], chat


def disagreements(samples: list[dict], records: list[dict], chat) -> list[str]:
    """Items where lm-eval's prompt, option log-likelihoods or chosen answer differ from the built-in's."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        record = records[sample["doc_id"]]
        prompt = chat.tokenizer.apply_chat_template(chat.prompted(record["prompt"]), add_generation_prompt=True,
                                                    tokenize=False)
        logps = [resp[0] for resp in sample["filtered_resps"]]
        chosen = "ABCD"[max(range(4), key=logps.__getitem__)]
        if sample["arguments"][0][0] != prompt:
            out.append(f"{record['item_id']}: prompt differs")
        elif logps != pytest.approx(record["logprobs"], abs=1e-4) or chosen != record["parsed_answer"]:
            out.append(f"{record['item_id']}: lm-eval {chosen} {logps}, built-in {record['parsed_answer']} {record['logprobs']}")
    return out


def run_task(run_dir: Path, system: str, tasks: Path, task: str = TASK, limit: int = LIMIT, output=None) -> dict:
    from experiments.lm_eval_bridge import evaluate_tasks

    return evaluate_tasks(run_dir, system, [task], output, limit=limit, include_path=tasks, log_samples=True,
                          include_defaults=False)


def test_lm_eval_agrees_with_builtin_scorer_item_by_item(run_dir, tmp_path):
    tasks = write_task(tmp_path / "tasks", TASK, PROMPT)
    scores = {}
    for system in ("base", "personafuse"):
        output = tmp_path / f"{system}.json"
        results = run_task(run_dir, system, tasks, output=output)
        samples = results["samples"][TASK]
        records, chat = builtin_records(run_dir, system)
        assert len(samples) == LIMIT
        assert disagreements(samples, records, chat) == [], system
        written = json.loads(output.read_text())  # lm-eval's results layout, with the same accuracy
        assert {"results", "configs", "versions", "n-samples", "config"} <= set(written) and "samples" not in written
        assert written["results"][TASK]["acc,none"] == pytest.approx(sum(r["correct"] for r in records) / LIMIT)
        assert written["config"]["model"] == "personafuse"
        scores[system] = [r["logprobs"] for r in records]
    assert scores["base"] != scores["personafuse"]  # the routed experts are in effect


def test_a_different_prompt_is_caught(run_dir, tmp_path):
    """The agreement check can fail: a task without the built-in's header line disagrees on every item."""
    tasks = write_task(tmp_path / "tasks", "pf_mmlu_no_header", PROMPT.split("\n\n", 1)[1])
    samples = run_task(run_dir, "base", tasks, "pf_mmlu_no_header", limit=3)["samples"]["pf_mmlu_no_header"]
    records, chat = builtin_records(run_dir, "base")
    assert len(disagreements(samples, records[:3], chat)) == 3


def test_generate_until_is_the_routed_greedy_reply_cut_at_the_stop_string(run_dir, tmp_path):
    name = "pf_mmlu_generate"
    tasks = write_task(tmp_path / "tasks", name, PROMPT, output_type="generate_until", doc_to_choice=None,
                       generation_kwargs={"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
                       metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    samples = run_task(run_dir, "personafuse", tasks, name, limit=3)["samples"][name]
    records, chat = builtin_records(run_dir, "personafuse")
    replies, gates = chat.generate_gated([records[s["doc_id"]]["prompt"] for s in samples], 12)
    assert len(gates) == 3  # routed: one gate row per request
    assert [s["resps"][0][0] for s in samples] == [r.split("\n")[0] for r in replies]


def test_a_context_without_the_chat_template_is_refused(run_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import experiments.lm_eval_bridge  # noqa: F401  (registers the model "personafuse")

    tasks = write_task(tmp_path / "tasks", TASK, PROMPT)
    with pytest.raises(ValueError, match="apply_chat_template"):
        simple_evaluate(model="personafuse", model_args={"run": str(run_dir), "system": "base"}, tasks=[TASK], limit=1,
                        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
