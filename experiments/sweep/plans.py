"""Which trials a sweep runs: a grid, seeded random proposals, or TPE asking as results arrive."""
from __future__ import annotations

import itertools
from typing import Any, Optional

from experiments.sweep.schema import Param, Sweep
from experiments.sweep.trials import Trial, build_trial


def grid_params(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest (the order the file lists them)."""
    keys = [p.key for p in sweep.params]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.values for p in sweep.params))]


def sampled_params(sweep: Sweep, n: int) -> list[dict[str, Any]]:
    """The first n proposals of the seeded sampler without feedback (all of a random sweep, tpe's startup)."""
    study, dists = _new_study(sweep)
    return [_ask(study, dists)[1] for _ in range(n)]


def _new_study(sweep: Sweep):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = sweep.spec
    if spec.method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    study = optuna.create_study(direction=spec.objective.direction, sampler=sampler, study_name=spec.name)
    return study, {p.key: p.distribution() for p in sweep.params}


def _ask(study, dists) -> tuple[Any, dict[str, Any]]:
    trial = study.ask(dists)
    return trial, {key: trial.params[key] for key in dists}


def validate_search_space(sweep: Sweep, launcher_overrides: list[str]) -> None:
    """tpe proposes trials as results arrive: check every parameter's bounds and choices now."""
    for param in sweep.params:
        for value in param.candidates():
            probe = Sweep(sweep.spec, sweep.source, [Param(param.key, values=[value])], sweep.folder)
            build_trial(probe, {param.key: value}, launcher_overrides)


class FixedPlan:
    """Trials known up front (grid, random): validated before the first one starts."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials
        self.total = len(trials)
        self._next = iter(trials)

    def next_trial(self) -> Optional[Trial]:
        return next(self._next, None)

    def tell(self, trial: Trial, value: Optional[float]) -> None:
        """Results do not change a fixed plan."""


class TPEPlan:
    """Optuna ask/tell: each proposal uses the results told so far."""

    def __init__(self, sweep: Sweep, launcher_overrides: list[str]) -> None:
        self.sweep, self.launcher_overrides = sweep, launcher_overrides
        self.study, self.dists = _new_study(sweep)
        self.total = int(sweep.spec.trials)
        self.asked = 0
        self.pending: dict[str, list] = {}

    def next_trial(self) -> Optional[Trial]:
        if self.asked >= self.total:
            return None
        self.asked += 1
        handle, params = _ask(self.study, self.dists)
        trial = build_trial(self.sweep, params, self.launcher_overrides)
        self.pending.setdefault(trial.id, []).append(handle)
        return trial

    def tell(self, trial: Trial, value: Optional[float]) -> None:
        from optuna.trial import TrialState

        handles = self.pending.get(trial.id)
        if not handles:
            return
        handle = handles.pop()  # last asked first: a repeated proposal is told at once, before the original ends
        if value is None:
            self.study.tell(handle, state=TrialState.FAIL)
        else:
            self.study.tell(handle, value)


def make_plan(sweep: Sweep, launcher_overrides: list[str]):
    """Grid and random: every trial, validated now. tpe: the search space validated now."""
    if sweep.spec.method == "tpe":
        validate_search_space(sweep, launcher_overrides)
        return TPEPlan(sweep, launcher_overrides)
    params = grid_params(sweep) if sweep.spec.method == "grid" else sampled_params(sweep, int(sweep.spec.trials))
    trials, seen = [], set()
    for p in params:
        trial = build_trial(sweep, p, launcher_overrides)
        if trial.id not in seen:  # a random sweep over few choices can repeat itself
            seen.add(trial.id)
            trials.append(trial)
    return FixedPlan(trials)
