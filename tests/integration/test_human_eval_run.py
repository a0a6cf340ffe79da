"""`personafuse human-eval export|import` on a real evaluate run (the quickstart's evaluate stage on the
tiny model) and its real MLflow store: blinding, unblinding, errors that write nothing, and the results
in the evaluate run's metrics, comparison table and charts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from experiments.cli import main
from experiments.human_eval.verdicts import add_verdict, verdict_path

pytestmark = pytest.mark.integration


def _external(tmp_path: Path, run: Path, name: str) -> Path:
    """Replies from 'outside' to the run's downstream situations, as a user would bring GPT-4o's."""
    records = json.loads((run / "evaluate/records/base/downstream.json").read_text())
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"situation_id": r["item_id"], "reply": f"an outside reply to {r['item_id']}"}) + "\n"
                            for r in records))
    return path


@pytest.fixture(scope="module")
def study(evaluated_run, tmp_path_factory):
    run, _ = evaluated_run
    tmp = tmp_path_factory.mktemp("study")
    gpt = _external(tmp, run, "gpt4o")
    out = tmp / "study"
    assert main(["human-eval", "export", str(run), str(out), "--pair", "prompting:base", "--pair", "prompting:gpt4o",
                 "--external", f"gpt4o={gpt}", "--raters", "2", "--overlap", "0.5", "--seed", "1"]) == 0
    return run, out


def test_raters_files_hold_no_system_names_and_the_key_unblinds(study):
    run, out = study
    rater_side = (out / "pairs.jsonl").read_text() + (out / "assignments.json").read_text()
    for name in ("prompting", "base", "gpt4o"):
        assert name not in rater_side
    key = json.loads((out / "key.json").read_text())
    replies = {s: {r["item_id"]: r["reply"] for r in json.loads((run / f"evaluate/records/{s}/downstream.json").read_text())}
               for s in ("base", "prompting")}
    replies["gpt4o"] = {sid: f"an outside reply to {sid}" for sid in replies["base"]}
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 * len(replies["base"]) and set(key["pairs"]) == {p["pair_id"] for p in pairs}
    for pair in pairs:
        entry = key["pairs"][pair["pair_id"]]
        assert pair["a"] == replies[entry["a"]][pair["situation_id"]] and pair["b"] == replies[entry["b"]][pair["situation_id"]]
        assert {entry["a"], entry["b"]} == set(entry["comparison"])
    assignments = json.loads((out / "assignments.json").read_text())
    assert set(key["overlap_pairs"]) == set(assignments["r1"]) & set(assignments["r2"]) and key["overlap_pairs"]


@pytest.mark.parametrize("line,message", [
    ("{not json", "gpt4o.jsonl:2: malformed JSONL"),
    ('{"situation_id": "no_such_situation", "reply": "x"}', "gpt4o.jsonl:2: unknown situation id 'no_such_situation'"),
    (None, "gpt4o.jsonl:2: situation '.*' again"),
])
def test_bad_external_files_fail_naming_the_line_and_write_nothing(evaluated_run, tmp_path, capsys, line, message):
    run, _ = evaluated_run
    path = _external(tmp_path, run, "gpt4o")
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + (line or first) + "\n")
    assert main(["human-eval", "export", str(run), str(tmp_path / "out"), "--external", f"gpt4o={path}"]) == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", ""))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_unknown_system_and_reexport_over_verdicts_are_refused(study, tmp_path, capsys):
    run, out = study
    assert main(["human-eval", "export", str(run), str(tmp_path / "o"), "--pair", "promting:base"]) == 2
    assert "did you mean 'prompting'" in capsys.readouterr().err
    assert main(["human-eval", "export", str(run), str(out), "--pair", "prompting:base"]) == 2
    assert "not empty" in capsys.readouterr().err


def _rate(out: Path, key: dict, assignments: dict) -> dict[tuple[str, str], list[str]]:
    """Every assigned pair rated through the page's writer: prompting preferred, except a tie on the
    first overlap pair, which both raters give (perfect agreement on two kinds of answer)."""
    tally: dict[tuple[str, str], list[str]] = {}
    for rater, ids in assignments.items():
        for pair_id in ids:
            entry = key["pairs"][pair_id]
            choice = "tie" if pair_id == key["overlap_pairs"][0] else "A" if entry["a"] == "prompting" else "B"
            add_verdict(out, rater, ids, pair_id, choice, f"{rater} on {pair_id}")
            tally.setdefault(tuple(entry["comparison"]), []).append("tie" if choice == "tie" else "win")
    return tally


def test_import_logs_rates_intervals_and_kappa_to_the_evaluate_run(study, evaluated_run, capsys):
    run, out = study
    _, uri = evaluated_run
    key, assignments = (json.loads((out / f).read_text()) for f in ("key.json", "assignments.json"))
    tally = _rate(out, key, assignments)
    before = {r: verdict_path(out, r).read_bytes() for r in assignments}
    assert main(["human-eval", "import", str(out)]) == 0
    assert main(["human-eval", "import", str(out)]) == 0  # a second import replaces, never duplicates
    assert {r: verdict_path(out, r).read_bytes() for r in assignments} == before
    run_id = json.loads((run / "evaluate/state.json").read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    for (left, right), outcomes in tally.items():
        name = f"human/{left}_vs_{right}"
        assert metrics[f"{name}/win_rate"] == pytest.approx(outcomes.count("win") / len(outcomes))
        assert metrics[f"{name}/tie_rate"] == pytest.approx(outcomes.count("tie") / len(outcomes))
        assert metrics[f"{name}/loss_rate"] == 0.0 and metrics[f"{name}/verdicts"] == len(outcomes)
        assert metrics[f"{name}/win_rate_ci_low"] <= metrics[f"{name}/win_rate"] <= metrics[f"{name}/win_rate_ci_high"]
    assert metrics["human/kappa"] == pytest.approx(1.0) and metrics["human/kappa_raters"] == 2
    table = json.loads(Path(client.download_artifacts(run_id, "comparison_table.json")).read_text())
    assert sorted(row[0] for row in table["data"]) == ["base", "prompting"]  # replaced, not appended
    assert "human/win_rate_vs_gpt4o" in table["columns"] and "human/win_rate_vs_base_ci_low" in table["columns"]
    assert "human/win_rate_vs_base" in (run / "evaluate/comparison.md").read_text()
    logged = {a.path for a in client.list_artifacts(run_id, "human_eval")}
    assert {"human_eval/human_eval.md", "human_eval/human_eval.png", "human_eval/human_eval.csv"} <= logged
    assert "cohen kappa = 1.000" in capsys.readouterr().out


def test_a_damaged_verdict_file_stops_import_and_is_kept(study, capsys):
    _, out = study
    path = verdict_path(out, "r2")
    kept = path.read_text()
    damaged = kept + kept.splitlines()[0] + "\n"
    path.write_text(damaged)
    try:
        assert main(["human-eval", "import", str(out)]) == 2
        assert f"r2.jsonl:{len(kept.splitlines()) + 1}: pair" in capsys.readouterr().err.replace("\n", "")
        assert path.read_text() == damaged
    finally:
        path.write_text(kept)
