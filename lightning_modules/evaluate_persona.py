"""The evaluate stage's side of `persona_expression`: its items, its classifier, its cross-system metrics.

The benchmark itself (datamodules/benchmarks/persona_expression.py) only scores; it cannot read the
experiment's corpus settings or build a model-side classifier, so the stage binds both here, and
adds the metrics that need another system (`pole_preference` against the baseline) or the
system's identity (`own_pole_rate` of an `expert_<pole>` system).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from datamodules.benchmarks.persona_expression import PREFIX, PersonaExpression, build_items, cross_system_metrics
from datamodules.io import project_root
from datamodules.persona_replies import load_persona_replies
from datamodules.personas import load_personas
from datamodules.situations import load_situations, split_of, split_situations
from lightning_modules.evaluate_systems import SYSTEMS


class LazyPoleClassifier:
    """Fits the pole classifier on the train-split curated replies at its first call (a resumed
    evaluation whose persona_expression jobs are all cached never pays the ~30 s of embedding).
    Centered: each reply is read relative to its situation's centroid (see PoleClassifier)."""

    def __init__(self, replies: dict, splits: dict[str, str], poles: list[str], traits: list[str]) -> None:
        self.replies, self.splits, self.poles, self.traits = replies, splits, poles, traits
        self._fitted = None
        self.scores: Optional[dict[str, float]] = None

    def __call__(self, texts: list[str], references: list[list[str]]) -> list[list[float]]:
        from lightning_modules.components.pole_classifier import classify_texts, train_pole_classifier

        if self._fitted is None:
            clf, encoder, self.scores = train_pole_classifier(self.replies, self.splits, self.poles, self.traits,
                                                              centered=True)
            self._fitted = (clf, encoder)
        return classify_texts(*self._fitted, texts, references)


def bind_persona_expression(bench: PersonaExpression, cfg) -> None:
    """Held-out test situations with their curated references, the persona set's poles, a lazy classifier."""
    personas = load_personas(cfg.personas.file)
    corpus = load_situations(cfg.data.situations, personas, cfg.data.on_bad_line)
    splits = split_situations(corpus, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    path = Path(bench.replies or cfg.datagen.teacher.replies)
    path = path if path.is_absolute() or path.exists() else project_root() / path
    replies = load_persona_replies(path, personas, known_ids={s.id for s in corpus})
    items = build_items(splits["test"], replies, personas.ids)
    if not items:
        raise ValueError(f"persona_expression: {path} has no reply for any test-split situation")
    classifier = LazyPoleClassifier(replies, split_of(splits), personas.ids, [p.trait for p in personas.poles])
    bench.bind(items, personas.ids, classifier, personas.trait_pairs())


def add_persona_expression_metrics(by_system: dict[str, dict], bench: PersonaExpression, baseline: str,
                                   samples: int, seed: int) -> None:
    """pole_preference for every system against the baseline, own_pole_rate for experts alone; every
    system gets the same keys (NaN where a metric does not apply) so MLflow's compare view lines up."""
    records = {s: e["records"][PREFIX] for s, e in by_system.items() if e["records"].get(PREFIX)}
    own = {}
    for system in records:
        pole = SYSTEMS.get(system).pole if system in SYSTEMS else None
        own[system] = bench.poles.index(pole) if pole in bench.poles else None
    extra = cross_system_metrics(records, own, baseline, bench.pairs, samples, seed)
    keys = {k for m in extra.values() for k in m}
    for system, metrics in extra.items():
        by_system[system]["metrics"].update({k: metrics.get(k, float("nan")) for k in keys})
