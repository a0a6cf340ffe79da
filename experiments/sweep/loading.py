"""Loading a sweep file: schema <- YAML <- overrides, strict validation, one-line errors."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from experiments import registry
from datamodules.io import did_you_mean, read_yaml_mapping
from experiments.config import ExperimentConfig, _schema_keys
from experiments.sweep.schema import DIRECTIONS, LAUNCHER_MINIMUMS, METHODS, Param, RangeSpec, Sweep, SweepError, SweepSpec


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), launcher: Optional[str] = None) -> Sweep:
    """Schema <- sweep YAML <- key=value overrides (<- --launcher), validated strictly."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", SweepError)
    merged = _merge(OmegaConf.structured(SweepSpec), data, str(path))
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"sweep override {item!r} must look like key=value (e.g. launcher.parallel=2)")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}' (on {path})")
    if launcher:
        merged.launcher.kind = launcher
    try:
        spec: SweepSpec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    spec.name = spec.name or path.stem
    _check_spec(spec, str(path))
    folder = Path(spec.output_dir or f"outputs/sweeps/{spec.name}").absolute()
    return Sweep(spec, path, _parse_params(spec, str(path)), folder)


def _merge(base, data, source: str):
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _explain(err: OmegaConfBaseException, source: str) -> SweepError:
    """One line naming the file, the key and the closest valid key."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, MissingMandatoryValue):
        return SweepError(f"{source}: missing required key '{key}'")
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        known = _schema_keys(SweepSpec)
        hint = did_you_mean(str(key), known)
        section = str(key).rpartition(".")[0]
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
        return SweepError(f"{source}: unknown sweep key '{key}'{hint} (valid{f' in {section}' if section else ''}: {', '.join(siblings)})")
    if isinstance(err, ValidationError):
        return SweepError(f"{source}: wrong type for sweep key '{key}': {str(err).splitlines()[0]}")
    return SweepError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def _check_spec(spec: SweepSpec, source: str) -> None:
    """Checks a schema cannot express: allowed values and combinations."""
    problems = []
    if spec.method not in METHODS:
        problems.append(f"method '{spec.method}' is not one of {', '.join(METHODS)}")
    if spec.method == "grid" and spec.trials is not None:
        problems.append("trials applies to random and tpe only (a grid runs every combination)")
    if spec.method != "grid" and (spec.trials is None or spec.trials < 1):
        problems.append(f"method {spec.method} needs trials: N (N >= 1)")
    if not spec.parameters:
        problems.append("parameters is empty: name at least one config key to vary")
    if spec.objective.direction not in DIRECTIONS:
        problems.append(f"objective.direction '{spec.objective.direction}' is not one of {', '.join(DIRECTIONS)}")
    if spec.objective.stage is not None and spec.objective.stage not in registry.STAGES:
        problems.append(f"objective.stage: {registry.STAGES.unknown_message(spec.objective.stage)}")
    if spec.launcher.kind not in registry.LAUNCHERS:
        problems.append(f"launcher.kind: {registry.LAUNCHERS.unknown_message(spec.launcher.kind)}")
    problems += [f"launcher.{key} must be >= {low} (got {getattr(spec.launcher, key)})"
                 for key, low in LAUNCHER_MINIMUMS.items() if getattr(spec.launcher, key) < low]
    if spec.launcher.array and spec.method == "tpe":
        problems.append("launcher.array needs every trial up front: use method grid or random (tpe waits for results)")
    if problems:
        raise SweepError(f"{source}: " + "; ".join(problems))


def _parse_params(spec: SweepSpec, source: str) -> list[Param]:
    """Each parameter as grid values, categorical choices or a typed range."""
    out = []
    for key, raw in spec.parameters.items():
        where = f"{source}: parameters.{key}"
        if isinstance(raw, list):
            if not raw:
                raise SweepError(f"{where}: an empty list of values")
            if spec.method != "grid" and any(isinstance(v, (list, dict)) for v in raw):
                raise SweepError(f"{where}: search choices must be scalars (Optuna); use method: grid for list values")
            out.append(Param(key, values=list(raw)))
        elif isinstance(raw, dict):
            if spec.method == "grid":
                raise SweepError(f"{where}: a grid takes a list of values; ranges need method: random or tpe")
            out.append(_range_param(key, raw, where))
        else:
            raise SweepError(f"{where}: expected a list of values or {{low, high, log}} / {{choices: [...]}}, got {raw!r}")
    return out


def _range_param(key: str, raw: dict, where: str) -> Param:
    valid = [f.name for f in dataclasses.fields(RangeSpec)]
    for name in raw:
        if name not in valid:
            raise SweepError(f"{where}: unknown range key '{name}'{did_you_mean(str(name), valid)} (valid: {', '.join(valid)})")
    rng: RangeSpec = OmegaConf.to_object(_merge(OmegaConf.structured(RangeSpec), raw, where))
    if rng.choices is not None:
        if rng.low is not None or rng.high is not None or not rng.choices:
            raise SweepError(f"{where}: give either non-empty choices or low/high, not both")
        bad = [c for c in rng.choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if bad:
            raise SweepError(f"{where}: choices must be scalars for Optuna, got {bad[0]!r}")
        return Param(key, values=list(rng.choices))
    if rng.low is None or rng.high is None or rng.low > rng.high:
        raise SweepError(f"{where}: a range needs low <= high (got low={rng.low}, high={rng.high})")
    if rng.log and rng.low <= 0:
        raise SweepError(f"{where}: log ranges need low > 0")
    schema_type = _schema_type(key)
    integer = schema_type is int or (schema_type is None and isinstance(raw.get("low"), int) and isinstance(raw.get("high"), int))
    if integer and (rng.low != int(rng.low) or rng.high != int(rng.high)):
        raise SweepError(f"{where}: {key} is an integer key; low/high must be whole numbers")
    if integer and rng.log and rng.step not in (None, 1):
        raise SweepError(f"{where}: integer log ranges cannot have a step")
    return Param(key, low=int(rng.low) if integer else rng.low, high=int(rng.high) if integer else rng.high,
                 log=rng.log, step=rng.step, integer=integer)


def _schema_type(key: str) -> Optional[type]:
    """The experiment schema's type of a dotted key (None for keys inside free-form dicts)."""
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if dataclasses.is_dataclass(hint) and i < len(parts) - 1:
            cls = hint
            continue
        return hint if i == len(parts) - 1 and isinstance(hint, type) else None
    return None
