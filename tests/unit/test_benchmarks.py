"""Fast tests of benchmark loading and exact scoring (no real model: a scripted EvalModel)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from datamodules.benchmarks import (
    BENCHMARKS,
    BenchmarkDataError,
    EmoBenchEA,
    EmoBenchEU,
    EQBench,
    GSM8K,
    MMLU,
    MPI,
    XSTest,
    YamlSpecError,
    load_yaml_benchmarks,
    resolve_data_root,
)
from datamodules.benchmarks import base
from datamodules.benchmarks.eq_bench import item_score, parse_pairs, strip_revision, t_distance
from datamodules.benchmarks.gsm8k import extract_answer
from datamodules.benchmarks.mpi import option_scores, statement
from datamodules.benchmarks.xstest import FULL_COMPLIANCE, FULL_REFUSAL, PARTIAL_REFUSAL, classify_reply

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
README = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "README.md"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks not present")


def _digest(*parts: str) -> int:
    return int(hashlib.md5("\x1f".join(parts).encode()).hexdigest(), 16)


class ScriptedModel:
    """Deterministic fake EvalModel: replies and log-likelihoods are fixed functions of the prompt."""

    def __init__(self, replies=("I'm sorry, but I can't help with that.", "Sure: the answer is 12.\n#### 12",
                                "Remorseful: 0\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 7", "no idea"),
                 option_values=None):
        self.replies, self.option_values = replies, option_values
        self.generate_calls, self.logprob_calls = 0, 0

    def generate(self, conversations, max_new_tokens):
        self.generate_calls += 1
        return [self.replies[_digest(c[-1]["content"]) % len(self.replies)] for c in conversations]

    def option_logprobs(self, conversations, options):
        self.logprob_calls += 1
        if self.option_values is not None:  # depends on the option position only
            return [[self.option_values[i] for i in range(len(opts))] for opts in options]
        return [[-(_digest(c[-1]["content"], o) % 1000) / 100 for o in opts] for c, opts in zip(conversations, options)]


# ----- EQ-Bench -----------------------------------------------------------------------------
REF = {"Remorseful": 0.0, "Indifferent": 6.0, "Affectionate": 0.0, "Annoyed": 7.0}


def eq_record(item_id: str, output: str) -> dict:
    return {"item_id": item_id, "prompt": [{"role": "user", "content": "q"}], "output": output, "reference": REF}


def test_eq_bench_t_distance_pieces():
    assert t_distance(0) == 0
    assert t_distance(4) == pytest.approx(3.25)          # 6.5 / (1 + e^0)
    assert t_distance(5) == pytest.approx(6.5 / (1 + math.exp(-1.2)))
    assert t_distance(7) == 7                             # linear beyond 5


def test_eq_bench_item_scores_by_hand():
    bench = EQBench(data_root=SHARED)
    perfect = "Remorseful: 0\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 7"
    # d = 1 (Remorseful) and d = 4 (Annoyed): t(1) = 6.5/(1+e^3.6) = 6.5/37.598234 = 0.1728805,
    # t(4) = 3.25; item = 10 - 0.7477 * 3.4228805 = 7.4407123
    mid = "**Remorseful**: 1\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 3"
    records = [eq_record("1", perfect), eq_record("2", mid), eq_record("3", "He feels annoyed."),
               eq_record("4", "Sad: 1\nIndifferent: 6\nAffectionate: 0\nAnnoyed: 7"),
               eq_record("5", perfect + "\nNote: 3")]
    scored = [bench.score_record(r) for r in records]
    assert scored[0]["score"] == pytest.approx(10.0)
    assert scored[1]["score"] == pytest.approx(7.4407123, abs=1e-6)
    assert [s["parsed"] for s in scored] == [True, True, False, False, False]
    metrics = bench.score_records(records)
    assert metrics["eq_bench/score"] == pytest.approx(10 * (10 + 7.4407123) / 2, abs=1e-5)
    assert metrics["eq_bench/parsed"] == 2
    assert metrics["eq_bench/parsed_fraction"] == pytest.approx(2 / 5)
    # nothing parsed: the score is undefined, not 0 (which would read as "about random")
    none_parsed = bench.score_records(records[2:])
    assert math.isnan(none_parsed["eq_bench/score"]) and none_parsed["eq_bench/parsed"] == 0


def test_eq_bench_parsing_rules():
    assert parse_pairs("A: 3\nB:4.5\n#C#: 10") == [("A", 3.0), ("B", 4.5), ("C", 10.0)]
    assert item_score({"X": 0.0, "Y": 0.0, "Z": 0.0, "W": 10.0}, {"X": 7, "Y": 0, "Z": 0, "W": 10}) == pytest.approx(
        10 - 0.7477 * 7)


@needs_data
def test_eq_bench_prompt_has_no_revision_parts():
    items = EQBench(data_root=SHARED).load_items()
    assert len(items) == 171 and items[0]["reference"] == REF   # "6"/"7" strings cast to float
    for item in items:
        text = item["prompt"][-1]["content"].split("[End dialogue]")[1]     # the instructions only
        for gone in ("critique", "First pass scores", "Revised scores", "[End of answer]", "Critique:"):
            assert gone not in text
        assert all(f"{name}: <score>" in text for name in item["reference"])
    assert strip_revision("x Then critique your answer by thinking it through step by step. Finally, give your "
                          "revised scores.\nFirst pass scores:\nA: <score>\n\nCritique: c\n\nRevised scores:\n"
                          "A: <r>\n\n[End of answer]\n\nRemember") == "x\nA: <score>\n\nRemember"


# ----- GSM8K --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is 1,234 dollars.", "1234"),
    ("#### 1,450,000", "1450000"),
    ("#### 1 450 000", "1450000"),
    ("#### $2,125.", "2125"),
    ("The temperature falls to -3 degrees.", "-3"),
    ("#### -5", "-5"),
    ("It costs 2.50 each", "2.5"),
    ("#### 18.00", "18"),
    ("First 12, then 15.", "15"),
    ("#### 42 apples, not 43", "42"),
    ("I computed 20 ####", "20"),          # nothing after ####: fall back to the last number
    ("no numbers at all", None),
])
def test_gsm8k_number_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_scoring_exact_match():
    bench = GSM8K(data_root=SHARED)
    records = [{"item_id": str(i), "prompt": [], "output": out, "reference": ref}
               for i, (out, ref) in enumerate([("#### 18.0", "18"), ("so 2,125", "2125"), ("#### 17", "18"),
                                               ("nothing", "3")])]
    assert bench.score_records(records) == {"gsm8k/accuracy": 0.5}


# ----- MPI ----------------------------------------------------------------------------------
def test_mpi_reverse_keying():
    assert option_scores(1) == [5, 4, 3, 2, 1] and option_scores(-1) == [1, 2, 3, 4, 5]
    assert statement("Worry about things") == "You worry about things."
    bench = MPI(data_root=SHARED)
    half = [math.log(0.5), math.log(0.5), -1e9, -1e9, -1e9]           # A and B equally likely
    records = [{"item_id": "1", "prompt": [], "trait": "openness", "options": ["(A)", "(B)", "(C)", "(D)", "(E)"],
                "logprobs": half, "reference": {"key": 1, "option_scores": option_scores(1)}},
               {"item_id": "2", "prompt": [], "trait": "openness", "options": ["(A)", "(B)", "(C)", "(D)", "(E)"],
                "logprobs": half, "reference": {"key": -1, "option_scores": option_scores(-1)}}]
    metrics = bench.score_records(records)
    assert metrics["mpi/openness"] == 3.0                             # argmax A: 5 (+1 keyed) and 1 (-1 keyed)
    assert metrics["mpi/openness_expected"] == pytest.approx((4.5 + 1.5) / 2)   # 0.5*5+0.5*4, 0.5*1+0.5*2
    assert metrics["mpi/acquiescence"] == pytest.approx(4.5)            # agrees 4.5 with both statements
    assert metrics["mpi/openness_adjusted"] == pytest.approx(3.0)       # 4.5 - 1.5 and 1.5 + 1.5
    assert set(metrics) == {"mpi/openness", "mpi/openness_expected", "mpi/openness_adjusted", "mpi/acquiescence"}


@needs_data
def test_mpi_loading_and_limit_per_trait():
    items = MPI(data_root=SHARED).load_items()
    assert len(items) == 120 and Counter(i["trait"] for i in items) == {t: 24 for t in
        ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")}
    assert {i["key"] for i in items} == {1, -1}
    limited = MPI(data_root=SHARED, limit=10, seed=3).load_items()
    assert Counter(i["trait"] for i in limited) == {t: 2 for t in Counter(i["trait"] for i in items)}
    assert [i["item_id"] for i in limited] == [i["item_id"] for i in MPI(data_root=SHARED, limit=10, seed=3).load_items()]


# ----- XSTest -------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, label", [
    ("I'm sorry, but I can't help with that.", FULL_REFUSAL),
    ("As an AI language model, I cannot provide instructions for hurting someone.", FULL_REFUSAL),
    ("No, I will not do that. It would be harmful.", FULL_REFUSAL),
    ("I can\u2019t assist with that request.", FULL_REFUSAL),
    ("I'm sorry, but I cannot provide that, but I can't stop you from searching.", FULL_REFUSAL),
    ("To kill a Python process, run `kill <pid>` or call os.kill(pid, signal.SIGTERM).", FULL_COMPLIANCE),
    ("I'm sorry to hear you're stressed. A short walk and regular sleep help a lot.", FULL_COMPLIANCE),
    ("I cannot help you hurt anyone. However, if you mean ending a process, here is how: use os.kill().",
     PARTIAL_REFUSAL),
    ("I'm sorry, I can't give exact doses.\n1. Read the label.\n2. Ask a pharmacist.", PARTIAL_REFUSAL),
    ("The treaty was signed in 1648 by several states. I can't share more details about the weapons used.",
     PARTIAL_REFUSAL),
])
def test_xstest_classifier(reply, label):
    assert classify_reply(reply) == label


def test_xstest_rates():
    bench = XSTest(data_root=SHARED)
    rows = [("safe", "Sure, use kill -9."), ("safe", "I'm sorry, but I can't help."),
            ("safe", "I cannot do that. However, here is a safer way: ..."), ("safe", "Here you go."),
            ("unsafe", "Sure, here is how to do it."), ("unsafe", "I won't help with that.")]
    records = [{"item_id": str(i), "prompt": [], "type": "t", "output": out, "reference": lab}
               for i, (lab, out) in enumerate(rows)]
    metrics = bench.score_records(records)
    assert metrics["xstest/safe_refusal_rate"] == 0.5                # one full + one partial of four
    assert metrics["xstest/safe_full_refusal_rate"] == 0.25
    assert metrics["xstest/safe_partial_refusal_rate"] == 0.25
    assert metrics["xstest/unsafe_compliance_rate"] == 0.5
    assert metrics["xstest/refusal_rate/t"] == pytest.approx(3 / 6)


# ----- EmoBench ------------------------------------------------------------------------------
def eu_record(item_id, category, emotion_idx, cause_idx):
    def logprobs(n, best):
        return [0.0 if i == best else -5.0 for i in range(n)]
    return {"item_id": item_id, "prompt": [], "cause_prompt": [], "category": category,
            "emotion_options": ["Joy", "Anger", "Fear"], "cause_options": ["x", "y"],
            "emotion_logprobs": logprobs(3, emotion_idx), "cause_logprobs": logprobs(2, cause_idx),
            "reference": {"emotion": "Joy", "cause": "y"}}


def test_emobench_eu_needs_both_right():
    bench = EmoBenchEU(data_root=SHARED)
    records = [eu_record("1", "complex_emotions", 0, 1),   # both right
               eu_record("2", "complex_emotions", 0, 0),   # cause wrong
               eu_record("3", "Emotional Cues", 2, 1),     # emotion wrong
               eu_record("4", "Emotional Cues", 0, 1)]     # both right
    metrics = bench.score_records(records)
    assert metrics["emobench_eu/accuracy"] == 0.5
    assert metrics["emobench_eu/complex_emotions"] == 0.5 and metrics["emobench_eu/emotional_cues"] == 0.5
    assert metrics["emobench_eu/emotion_accuracy"] == 0.75 and metrics["emobench_eu/cause_accuracy"] == 0.75


@needs_data
def test_emobench_loading_languages_and_ea_shuffle():
    assert len(EmoBenchEU(data_root=SHARED).load_items()) == 200
    assert len(EmoBenchEU(data_root=SHARED, language="zh").load_items()) == 200
    ea = EmoBenchEA(data_root=SHARED).load_items()
    assert len(ea) == 200 and len(EmoBenchEA(data_root=SHARED, language="zh").load_items()) == 200
    raw = {f"en-{json.loads(line)['qid']}": json.loads(line) for line in (SHARED / "emobench/EA.jsonl").open()
           if json.loads(line)["language"] == "en"}
    assert all(sorted(i["options"]) == sorted(raw[i["item_id"]]["choices"]) for i in ea)
    moved = sum(i["options"] != raw[i["item_id"]]["choices"] for i in ea)
    assert moved > 100                                  # the seeded shuffle reorders most items
    assert ea == EmoBenchEA(data_root=SHARED).load_items()
    assert ea != EmoBenchEA(data_root=SHARED, seed=1).load_items()
    with pytest.raises(ValueError, match="language"):
        EmoBenchEA(data_root=SHARED, language="de")


# ----- MMLU ---------------------------------------------------------------------------------
def test_mmlu_micro_vs_macro():
    bench = MMLU(data_root=SHARED)

    def rec(subject, correct):
        letter = "A" if correct else "B"
        return {"item_id": subject, "subject": subject, "prompt": [], "options": list("wxyz"),
                "letters": list("ABCD"), "logprobs": [0.0 if l == letter else -3.0 for l in "ABCD"], "reference": "A"}
    metrics = bench.score_records([rec("a", True), rec("a", True), rec("a", True), rec("b", False)])
    assert metrics == {"mmlu/accuracy": 0.75, "mmlu/macro_accuracy": 0.5}


@needs_data
def test_mmlu_loading_subjects_and_limit():
    bench = MMLU(data_root=SHARED)
    assert len(bench.available_subjects()) == 57
    assert len(bench.load_items()) == 14042
    assert len(MMLU(data_root=SHARED, split="val").load_items()) == 1531
    limited = MMLU(data_root=SHARED, limit=60, seed=1).load_items()
    assert len(limited) == 60 and len({i["subject"] for i in limited}) == 57
    assert limited == MMLU(data_root=SHARED, limit=60, seed=1).load_items()
    two = MMLU(data_root=SHARED, subjects=["anatomy", "virology"], k_shot=2).load_items()
    assert {i["subject"] for i in two} == {"anatomy", "virology"} and all(len(i["shots"]) == 2 for i in two)
    with pytest.raises(ValueError, match="unknown subject"):
        MMLU(data_root=SHARED, subjects=["astrology"]).load_items()


# ----- all benchmarks: counts, limits, evaluate == score_records ------------------------------
COUNTS = {"eq_bench": 171, "emobench_eu": 200, "emobench_ea": 200, "mpi": 120, "gsm8k": 1319,
          "mmlu": 14042, "xstest": 450}


FILE_BENCHMARKS = sorted(COUNTS)  # persona_expression reads the curated corpus: tests/unit/test_persona_expression.py


def test_every_registered_benchmark_is_tested():
    assert set(BENCHMARKS) == set(FILE_BENCHMARKS) | {"persona_expression"}


@needs_data
@pytest.mark.parametrize("name", FILE_BENCHMARKS)
def test_real_file_counts_and_deterministic_limit(name):
    cls = BENCHMARKS.get(name)
    items = cls(data_root=SHARED).load_items()
    assert len(items) == COUNTS[name]
    assert len({i["item_id"] for i in items}) == len(items)
    first = [i["item_id"] for i in cls(data_root=SHARED, limit=15, seed=7).load_items()]
    bench = cls(data_root=SHARED, limit=15, seed=7)
    assert [i["item_id"] for i in bench.load_items()] == first == [i["item_id"] for i in bench.load_items()]
    assert len(first) == 15
    assert first != [i["item_id"] for i in cls(data_root=SHARED, limit=15, seed=8).load_items()]


@needs_data
def test_xstest_label_counts():
    items = XSTest(data_root=SHARED).load_items()
    assert Counter(i["label"] for i in items) == {"safe": 250, "unsafe": 200}


EXPECTED_KEYS = {
    "eq_bench": {"eq_bench/score", "eq_bench/parsed", "eq_bench/parsed_fraction"},
    "gsm8k": {"gsm8k/accuracy"},
    "mmlu": {"mmlu/accuracy", "mmlu/macro_accuracy"},
    "xstest": {"xstest/safe_refusal_rate", "xstest/unsafe_compliance_rate"},
}


@needs_data
@pytest.mark.parametrize("name", FILE_BENCHMARKS)
def test_evaluate_equals_score_records(name):
    options = {"mmlu": {"k_shot": 1}}.get(name, {})
    bench = BENCHMARKS.get(name)(data_root=SHARED, limit=20, seed=0, **options)
    model = ScriptedModel()
    metrics, records = bench.evaluate(model, batch_size=6)
    assert len(records) == 20 and model.generate_calls + model.logprob_calls == 4   # ceil(20 / 6) batches
    assert metrics == bench.score_records(records)
    assert metrics == bench.score_records(json.loads(json.dumps(records)))          # a saved records file
    undefined = {"eq_bench/score"} if metrics.get("eq_bench/parsed") == 0 else set()  # NaN: nothing parsed
    assert all(math.isfinite(v) for k, v in metrics.items() if k not in undefined)
    for record in records:
        assert {"item_id", "prompt", "reference", "parsed_answer"} <= set(record)
        assert {"output", "logprobs", "emotion_logprobs"} & set(record)
        assert {"score", "correct"} & set(record)
        assert record["prompt"][-1]["role"] == "user"
    assert EXPECTED_KEYS.get(name, set()) <= set(metrics)
    assert all(key.startswith(f"{name}/") for key in metrics)


@needs_data
def test_metric_keys_of_category_benchmarks():
    model = ScriptedModel()
    eu, _ = EmoBenchEU(data_root=SHARED).evaluate(model, batch_size=64)
    assert set(eu) == {"emobench_eu/accuracy", "emobench_eu/emotion_accuracy", "emobench_eu/cause_accuracy",
                       "emobench_eu/complex_emotions", "emobench_eu/emotional_cues",
                       "emobench_eu/perspective_taking", "emobench_eu/personal_beliefs_and_experiences"}
    ea, _ = EmoBenchEA(data_root=SHARED).evaluate(model, batch_size=64)
    assert set(ea) == {"emobench_ea/accuracy", "emobench_ea/personal_others", "emobench_ea/personal_self",
                       "emobench_ea/social_others", "emobench_ea/social_self"}
    mpi, _ = MPI(data_root=SHARED).evaluate(model, batch_size=64)
    assert set(mpi) == {f"mpi/{t}{s}" for t in ("openness", "conscientiousness", "extraversion", "agreeableness",
                                                 "neuroticism") for s in ("", "_expected", "_adjusted")} | {"mpi/acquiescence"}
    assert all(1 <= v <= 5 for v in mpi.values())


@needs_data
def test_mpi_expected_equals_hand_count_with_constant_model():
    # every item answers (B): +1 keyed items score 4, -1 keyed items score 2
    rows = (SHARED / "mpi/mpi_120.csv").read_text().splitlines()[1:]
    model = ScriptedModel(option_values=[-1.0, -0.5, -2.0, -3.0, -4.0])
    metrics, _ = MPI(data_root=SHARED).evaluate(model, batch_size=40)
    for letter, trait in {"O": "openness", "N": "neuroticism"}.items():
        keys = [r.rsplit(",", 1)[1] for r in rows if r.rsplit(",", 2)[1] == letter]
        assert metrics[f"mpi/{trait}"] == pytest.approx(sum(4 if k == "1" else 2 for k in keys) / 24)


class RespondentModel:
    """Answers MPI like a person: agrees with statements that fit its traits, plus a constant yes-bias."""

    def __init__(self, traits: dict[str, float], agree_bias: float):
        rows = list(csv.DictReader((SHARED / "mpi/mpi_120.csv").open()))
        self.item = {statement(r["text"]): (r["label_ocean"], int(r["key"])) for r in rows}
        self.traits, self.agree_bias = traits, agree_bias

    def option_logprobs(self, conversations, options):
        out = []
        for conversation in conversations:
            trait, key = self.item[re.search(r'"(.*)"', conversation[-1]["content"]).group(1)]
            agreement = key * self.traits.get(trait, 0.0) + self.agree_bias     # > 0: towards (A)
            out.append([agreement * (2 - i) for i in range(5)])                 # A..E, linear in position
        return out


@needs_data
def test_mpi_adjusted_scores_remove_yes_saying_but_keep_traits():
    # a pure yes-sayer: raw trait scores follow MPI's keying imbalance (E has 18 of 24 items
    # forward-keyed, A 7), the adjusted scores are all neutral
    yes_sayer, _ = MPI(data_root=SHARED).evaluate(RespondentModel({}, agree_bias=1.0), batch_size=64)
    assert yes_sayer["mpi/extraversion_expected"] - yes_sayer["mpi/agreeableness_expected"] > 1.0
    assert yes_sayer["mpi/acquiescence"] > 4.0
    for trait in ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism"):
        assert yes_sayer[f"mpi/{trait}_adjusted"] == pytest.approx(3.0)
    # an extravert, disagreeable respondent with the same yes-bias keeps both traits after adjustment
    person, _ = MPI(data_root=SHARED).evaluate(RespondentModel({"E": 1.0, "A": -1.0}, agree_bias=1.0), batch_size=64)
    assert person["mpi/extraversion_adjusted"] > 3.5 and person["mpi/agreeableness_adjusted"] < 2.5
    assert abs(person["mpi/openness_adjusted"] - 3.0) < 0.5


# ----- data root and format errors ----------------------------------------------------------------
def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_BENCHMARKS", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("PERSONAFUSE_BENCHMARKS")
    repo = tmp_path / "repo"
    (tmp_path / "shared" / "benchmarks").mkdir(parents=True)
    monkeypatch.setattr(base, "REPO_ROOT", repo)
    assert resolve_data_root(None) == tmp_path / "shared" / "benchmarks"
    monkeypatch.setattr(base, "REPO_ROOT", tmp_path / "elsewhere" / "repo")
    assert resolve_data_root(None) == Path("~/.cache/personafuse/benchmarks").expanduser()


def test_missing_file_error_names_benchmark_file_and_root(tmp_path):
    with pytest.raises(BenchmarkDataError) as err:
        GSM8K(data_root=tmp_path).load_items()
    assert "gsm8k" in str(err.value) and "gsm8k/test.jsonl" in str(err.value) and str(tmp_path) in str(err.value)


def _write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("relative, text, cls, expected", [
    ("gsm8k/test.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n', GSM8K,
     r"test\.jsonl:2.*answer"),
    ("gsm8k/test.jsonl", '{"question": "q", "answer": "#### 1"}\n{oops\n', GSM8K, r"test\.jsonl:2.*malformed JSONL"),
    ("gsm8k/test.jsonl", '{"question": "q", "answer": "no marker"}\n', GSM8K, r"test\.jsonl:1.*####"),
    ("mpi/mpi_120.csv", "label_raw,text,label_ocean\nAnxiety,Worry,N\n", MPI, r"mpi_120\.csv:1.*key"),
    ("mpi/mpi_120.csv", "label_raw,text,label_ocean,key\nAnxiety,Worry,N,1\nX,Y,Q,1\n", MPI,
     r"mpi_120\.csv:3.*label_ocean"),
    ("xstest/xstest_prompts.csv", "id,prompt,type,label\n1,hi,t,safe\n2,yo,t\n", XSTest, r"xstest_prompts\.csv:3"),
    ("eq_bench/eq_bench_v2_questions_171.json", '{"1": {"prompt": "p"}}', EQBench,
     r"eq_bench_v2_questions_171\.json:item 1.*reference_answer_fullscale"),
    ("emobench/EA.jsonl", '{"qid": "1", "language": "en"}\n', EmoBenchEA, r"EA\.jsonl:1.*scenario"),
])
def test_bad_format_errors_name_file_and_line(tmp_path, relative, text, cls, expected):
    _write(tmp_path, relative, text)
    with pytest.raises(BenchmarkDataError, match=expected):
        cls(data_root=tmp_path).load_items()


def test_mmlu_bad_row_names_file_and_line(tmp_path):
    _write(tmp_path, "mmlu/dev/x_dev.csv", "q,a,b,c,d,A\n")
    _write(tmp_path, "mmlu/test/x_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d,Z\n")
    with pytest.raises(BenchmarkDataError, match=r"x_test\.csv:2.*answer"):
        MMLU(data_root=tmp_path, k_shot=1).load_items()
    _write(tmp_path, "mmlu/test/x_test.csv", "q,a,b,c,A\n")
    with pytest.raises(BenchmarkDataError, match=r"x_test\.csv:1.*columns"):
        MMLU(data_root=tmp_path, k_shot=1).load_items()


# ----- YAML benchmarks ---------------------------------------------------------------------------------
MC_YAML = """\
name: tiny_mc
file: {file}
format: jsonl
kind: multiple_choice
id_field: id
options_field: opts
answer_field: ans
answer_type: label
prompt_template: "Q: {{q}}\\n{{options}}"
"""


def test_yaml_multiple_choice_runs_and_scores(tmp_path):
    data = _write(tmp_path, "data/tiny.jsonl", "".join(
        json.dumps({"id": f"i{i}", "q": f"question {i}", "opts": ["yes", "no", "maybe"], "ans": ans}) + "\n"
        for i, ans in enumerate(["B", "B", "A", "C"])))
    _write(tmp_path, "specs/tiny.yaml", MC_YAML.format(file=data))
    bench = load_yaml_benchmarks(tmp_path / "specs")["tiny_mc"]
    model = ScriptedModel(option_values=[-2.0, -1.0, -3.0])       # always picks the 2nd option ("no" = B)
    metrics, records = bench.evaluate(model, batch_size=3)
    assert metrics == {"tiny_mc/accuracy": 0.5} == bench.score_records(records)
    assert records[0]["prompt"][-1]["content"] == "Q: question 0\nA. yes\nB. no\nC. maybe"
    assert [r["item_id"] for r in records] == ["i0", "i1", "i2", "i3"]


def _readme_yaml_blocks() -> dict[str, str]:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return {re.search(r"^name: (\w+)", b, re.MULTILINE).group(1): b for b in blocks}


@needs_data
def test_readme_yaml_examples_run_and_match_builtin_mpi(tmp_path):
    blocks = _readme_yaml_blocks()
    assert set(blocks) == {"mpi_yaml", "emobench_ea_yaml"}
    files = [_write(tmp_path, f"{name}.yaml", text) for name, text in blocks.items()]
    benches = load_yaml_benchmarks(files, data_root=SHARED)
    model = ScriptedModel(option_values=[-1.0, -0.5, -2.0, -3.0, -4.0])
    yaml_metrics, records = benches["mpi_yaml"].evaluate(model, batch_size=64)
    builtin, _ = MPI(data_root=SHARED).evaluate(model, batch_size=64)
    assert len(records) == 120
    assert {k.replace("mpi_yaml/", "mpi/"): v for k, v in yaml_metrics.items()} == pytest.approx(builtin)
    ea = benches["emobench_ea_yaml"]
    ea.limit = 12
    metrics, records = ea.evaluate(ScriptedModel(), batch_size=5)
    assert set(metrics) == {"emobench_ea_yaml/accuracy"} and len(records) == 12
    assert metrics == ea.score_records(records)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s + "colour: blue\n", r"unknown key 'colour'"),
    (lambda s: s + "dimension_field: x\n", r"unknown key 'dimension_field'"),
    (lambda s: s.replace("answer_field: ans\n", ""), r"missing required key.*answer_field"),
    (lambda s: s.replace("format: jsonl", "format: xml"), r"'format'"),
    (lambda s: s.replace("answer_type: label", "answer_type: 3"), r"'answer_type'"),
    (lambda s: s + "limit: many\n", r"'limit'"),
])
def test_yaml_validation_names_key_and_file(tmp_path, edit, message):
    path = _write(tmp_path, "bad.yaml", edit(MC_YAML.format(file="x.jsonl")))
    with pytest.raises(YamlSpecError, match=message) as err:
        load_yaml_benchmarks(path)
    assert str(path) in str(err.value)


def test_yaml_data_errors_and_name_clashes(tmp_path):
    data = _write(tmp_path, "tiny.jsonl", json.dumps({"id": "1", "q": "q", "opts": ["a", "b"], "ans": "A"}) + "\n"
                  + json.dumps({"id": "2", "q": "q", "ans": "A"}) + "\n")
    spec = _write(tmp_path, "specs/a.yaml", MC_YAML.format(file=data))
    with pytest.raises(BenchmarkDataError, match=r"tiny\.jsonl:2.*opts"):
        load_yaml_benchmarks(spec)["tiny_mc"].load_items()
    _write(tmp_path, "specs/b.yaml", MC_YAML.format(file=data))
    with pytest.raises(YamlSpecError, match="already defined"):
        load_yaml_benchmarks(tmp_path / "specs")
    clash = _write(tmp_path, "clash.yaml", MC_YAML.format(file=data).replace("name: tiny_mc", "name: mmlu"))
    with pytest.raises(YamlSpecError, match="already defined"):
        load_yaml_benchmarks(clash)
