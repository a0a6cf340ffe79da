"""persona_expression scoring with a scripted model and classifier (datamodules/benchmarks/persona_expression.py)."""
from __future__ import annotations

import pytest

from datamodules.benchmarks.persona_expression import PersonaExpression, pearson, preference_outcomes

POLES = ["a_high", "a_low", "b_high", "b_low"]
PAIRS = [(0, 1), (2, 3)]


def items():
    return [
        {"item_id": "s1", "prompt": [{"role": "user", "content": "one"}], "label": [0.9, 0.1, 0.2, 0.8],
         "references": ["ref a_high one", "ref a_low one", "ref b_high one", "ref b_low one"]},
        {"item_id": "s2", "prompt": [{"role": "user", "content": "two"}], "label": [0.1, 0.9, 0.5, 0.6],
         "references": ["ref a_high two", "ref a_low two", "ref b_high two", "ref b_low two"]},
    ]


class Scripted:
    """Replies name a pole; reference log-likelihoods favour `likes` by `boost` nats."""

    def __init__(self, replies: dict[str, str], likes: int | None = None, boost: float = 0.0):
        self.replies, self.likes, self.boost = replies, likes, boost

    def generate(self, conversations, max_new_tokens):
        return [self.replies[c[-1]["content"]] for c in conversations]

    def option_logprobs(self, conversations, options):
        return [[-10.0 + (self.boost if j == self.likes else 0.0) for j in range(len(opts))] for opts in options]


def classify(texts, references):
    """One-hot on the pole named in the text (a stand-in for the MiniLM probe)."""
    assert len(references) == len(texts) and all(len(r) == len(POLES) for r in references)
    return [[1.0 if pole in t else 0.0 for pole in POLES] for t in texts]


classify.scores = {"val_accuracy": 0.8, "val_trait_accuracy": 0.9}


def bench(**kw):
    return PersonaExpression(items=items(), poles=POLES, classifier=classify,
                             **kw)


def test_alignment_and_pole_rates_follow_the_classified_replies():
    metrics, records = bench().evaluate(Scripted({"one": "I am a_high", "two": "I am b_low"}), batch_size=2)
    assert records[0]["alignment"] == pytest.approx(pearson([0.9, 0.1, 0.2, 0.8], [1, 0, 0, 0]))
    assert metrics["persona_expression/pole_rate/a_high"] == 0.5 and metrics["persona_expression/pole_rate/b_low"] == 0.5
    assert metrics["persona_expression/classifier_val_accuracy"] == 0.8
    assert bench().score_records(records) == metrics  # records re-score to the metrics
    worse, _ = bench().evaluate(Scripted({"one": "I am a_low", "two": "I am a_high"}), batch_size=2)
    assert worse["persona_expression/alignment"] < metrics["persona_expression/alignment"]


def test_pole_preference_compares_gains_over_base_not_raw_likelihoods():
    base = bench().evaluate(Scripted({"one": "x", "two": "x"}), 2)[1]
    expert = bench().evaluate(Scripted({"one": "x", "two": "x"}, likes=0, boost=3.0), 2)[1]
    assert preference_outcomes(expert, base, PAIRS, own_pole=0) == [1.0, 1.0]
    assert preference_outcomes(expert, base, PAIRS, own_pole=1) == [0.0, 0.0]
    # routed system: s1 favours a_high (gap 0.8) and b_low (0.6); s2 favours a_low; b's gap 0.1 < 0.3 is skipped
    assert preference_outcomes(expert, base, PAIRS) == [1.0, 0.0, 0.0]
    assert preference_outcomes(base, base, PAIRS) == [0.0, 0.0, 0.0]  # no gain is no preference


def test_constant_vectors_have_no_correlation_and_a_missing_classifier_fails():
    assert pearson([0.5, 0.5], [0.1, 0.9]) is None
    with pytest.raises(RuntimeError, match="pole classifier"):
        PersonaExpression(items=items(), poles=POLES).evaluate(Scripted({"one": "x", "two": "x"}), 2)


def test_cross_system_metrics_give_own_pole_rate_and_preference_with_intervals():
    from datamodules.benchmarks.persona_expression import cross_system_metrics

    base = bench().evaluate(Scripted({"one": "x", "two": "x"}), 2)[1]
    expert = bench().evaluate(Scripted({"one": "I am a_high", "two": "I am a_high"}, likes=0, boost=3.0), 2)[1]
    out = cross_system_metrics({"base": base, "expert_a_high": expert}, {"base": None, "expert_a_high": 0}, "base",
                               PAIRS, samples=200, seed=0)
    m = out["expert_a_high"]
    assert m["persona_expression/own_pole_rate"] == 1.0 and m["persona_expression/pole_preference"] == 1.0
    assert m["persona_expression/pole_preference_ci_low"] == 1.0 and m["persona_expression/pole_comparisons"] == 2
    assert out["base"] == {}  # the baseline is not compared with itself
