"""Which trials a sweep runs: a grid, seeded random proposals, or TPE asking as results arrive."""
from __future__ import annotations

import itertools
from typing import Any, Optional

from experiments.sweep.schema import Param, Sweep, SweepError
from experiments.sweep.trials import Trial, build_trial


def grid_params(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest (the order the file lists them)."""
    keys = [p.key for p in sweep.params]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.values for p in sweep.params))]


def sampled_params(sweep: Sweep, n: int) -> list[dict[str, Any]]:
    """The first n proposals of the seeded sampler without feedback (all of a random sweep, tpe's startup)."""
    study, dists = _new_study(sweep), _distributions(sweep)
    return [_ask(study, sweep, dists)[1] for _ in range(n)]


def _distributions(sweep: Sweep) -> dict[str, Any]:
    return {p.key: p.distribution() for p in sweep.params}


def _new_study(sweep: Sweep, storage=None):
    """The sweep's study: in memory (dry run, random), or loaded from `storage` when it exists there."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = sweep.spec
    sampler = optuna.samplers.RandomSampler(seed=spec.seed) if spec.method == "random" else None
    return optuna.create_study(direction=spec.objective.direction, sampler=sampler, study_name=spec.name,
                               storage=storage, load_if_exists=storage is not None)


def _tpe_sampler(sweep: Sweep, number: int):
    """A TPE sampler seeded by (sweep seed, trial number). A sampler's RNG lives in memory and advances
    with every ask, so one seeded sampler per process would propose differently after a relaunch; seeded
    per trial, a proposal depends only on the study's stored trials and its number."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([sweep.spec.seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.spec.startup_trials)


def _ask(study, sweep: Sweep, dists) -> tuple[Any, dict[str, Any]]:
    if sweep.spec.method == "tpe":
        study.sampler = _tpe_sampler(sweep, len(study.get_trials(deepcopy=False)))
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


STUDY_FILE = "optuna.journal"


class TPEPlan:
    """Optuna ask/tell on a study kept in the sweep folder, so a relaunch resumes the sampler exactly.

    Storage: Optuna's JournalStorage on a JournalFileBackend (`<sweep folder>/optuna.journal`). Each
    ask and tell is one JSON line appended and fsync'd before the call returns, and opening the file
    replays it, so a kill -9 leaves the study as of its last completed call. Optuna wrote this backend
    for NFS, where SQLite's fcntl locks are unreliable; sweep folders on clusters often live there.
    A kill -9 inside an append leaves a stale journal lock that the next open breaks after 30 s.

    A trial asked but never told (the sweep died while it ran) stays RUNNING in the study. A relaunch
    hands it out again as the same Optuna trial, same number and params, and tells it when it ends:
    the study then holds exactly what an uninterrupted sweep would, and the next proposal is the same
    (failing it and asking anew would add a FAIL trial and shift every later seed and proposal).
    Trials already told are handed out too, in number order, so the runner counts and reports them;
    telling one again is a no-op (a failed trial rerun by a relaunch does not change the study).
    """

    def __init__(self, sweep: Sweep, launcher_overrides: list[str]) -> None:
        self.sweep, self.launcher_overrides = sweep, launcher_overrides
        self.dists = _distributions(sweep)
        self.total = int(sweep.spec.trials)
        self.pending: dict[str, list[int]] = {}
        self._study = None
        self._earlier: list = []

    @property
    def study(self):
        """Opened on first use, so `--dry-run` (which builds a plan) creates nothing."""
        if self._study is None:
            self._study = open_study(self.sweep)
            self._earlier = sorted(self._study.get_trials(deepcopy=False), key=lambda t: t.number)
        return self._study

    def next_trial(self) -> Optional[Trial]:
        study = self.study
        if self._earlier:
            frozen = self._earlier.pop(0)
            return self._hand_out(frozen.number, {key: frozen.params[key] for key in self.dists})
        if len(study.get_trials(deepcopy=False)) >= self.total:
            return None
        handle, params = _ask(study, self.sweep, self.dists)
        return self._hand_out(handle.number, params)

    def _hand_out(self, number: int, params: dict[str, Any]) -> Trial:
        trial = build_trial(self.sweep, params, self.launcher_overrides)
        self.pending.setdefault(trial.id, []).append(number)
        return trial

    def tell(self, trial: Trial, value: Optional[float]) -> None:
        from optuna.trial import TrialState

        numbers = self.pending.get(trial.id)
        if not numbers:
            return
        number = numbers.pop()  # last asked first: a repeated proposal is told at once, before the original ends
        if value is None:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            self.study.tell(number, value, skip_if_finished=True)


def open_study(sweep: Sweep):
    """The sweep's study in `<sweep folder>/optuna.journal`, created on first use and loaded after.
    A study started by another version of the sweep file (search space, seed, direction) is refused:
    its stored trials would not be the ones this file proposes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep.folder.mkdir(parents=True, exist_ok=True)
    path = sweep.folder / STUDY_FILE
    study = _new_study(sweep, JournalStorage(JournalFileBackend(str(path))))
    fingerprint = _fingerprint(sweep)
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", fingerprint)
    elif stored != fingerprint:
        changed = ", ".join(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise SweepError(f"{sweep.source}: {changed} changed since the TPE study in {path} was started; "
                         f"restore them, or set output_dir to a new folder (or delete {path}) to start a new study")
    return study


def _fingerprint(sweep: Sweep) -> dict[str, Any]:
    """What decides the proposals, as stored in the study (JSON)."""
    from optuna.distributions import distribution_to_json

    spec = sweep.spec
    return {"parameters": {k: distribution_to_json(d) for k, d in _distributions(sweep).items()},
            "seed": spec.seed, "startup_trials": spec.startup_trials, "direction": spec.objective.direction}


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
