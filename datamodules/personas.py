"""Personas are data: a YAML file defines each pole (one persona expert per pole).

A different trait model (HEXACO, a 4-pole toy set) is a new YAML, not new code: the number of
experts, their ids (which are also their PEFT adapter names) and their order come from the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from datamodules.io import DataError, did_you_mean, read_yaml_mapping

BIG_FIVE = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
"""The five traits of the shipped persona set, in OCEAN order (MPI-120 scores, trait ablations, reports)."""

_POLE_KEYS = {"id", "trait", "pole", "description", "markers", "system_prompt", "examples"}
_SET_KEYS = {"name", "description", "source", "poles"}


@dataclass(frozen=True)
class Example:
    user: str
    reply: str


@dataclass(frozen=True)
class Pole:
    id: str
    trait: str
    pole: str
    description: str
    markers: tuple[str, ...]
    system_prompt: str
    examples: tuple[Example, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class PersonaSet:
    name: str
    poles: tuple[Pole, ...]
    description: str = ""

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.poles]

    @property
    def traits(self) -> list[str]:
        """Traits in file order, each once."""
        return list(dict.fromkeys(p.trait for p in self.poles))

    def index(self, pole_id: str) -> int:
        try:
            return self.ids.index(pole_id)
        except ValueError:
            raise KeyError(f"unknown pole '{pole_id}' (persona set '{self.name}' has {', '.join(self.ids)})") from None

    def trait_pairs(self) -> list[tuple[int, int]]:
        """(high index, low index) per trait with both poles, for the pole-exclusivity loss."""
        pairs = []
        for trait in self.traits:
            idx = {p.pole: i for i, p in enumerate(self.poles) if p.trait == trait}
            if "high" in idx and "low" in idx:
                pairs.append((idx["high"], idx["low"]))
        return pairs

    def label_vector(self, label: dict[str, float], where: str) -> list[float]:
        """A label dict in pole order; every pole must be present and in [0, 1]."""
        vec = []
        for pole_id in self.ids:
            if pole_id not in label:
                raise DataError(f"{where}: label is missing pole '{pole_id}'")
            value = float(label[pole_id])
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{where}: label['{pole_id}'] = {value} is outside [0, 1]")
            vec.append(value)
        return vec


def load_personas(path: str | Path) -> PersonaSet:
    """Parse and validate a persona YAML; errors name the file and the offending key."""
    path = Path(path)
    data = read_yaml_mapping(path, "persona file")
    if "poles" not in data:
        raise DataError(f"{path}: expected a mapping with a 'poles' list")
    _no_unknown(data, _SET_KEYS, str(path))
    poles = tuple(_parse_pole(p, f"{path}: poles[{i}]") for i, p in enumerate(data["poles"]))
    ids = [p.id for p in poles]
    if len(set(ids)) != len(ids) or not ids:
        raise DataError(f"{path}: pole ids must be unique and non-empty, got {ids}")
    return PersonaSet(name=str(data.get("name", path.stem)), poles=poles, description=str(data.get("description", "")))


def _parse_pole(raw: dict, where: str) -> Pole:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: each pole must be a mapping")
    _no_unknown(raw, _POLE_KEYS, where)
    for key in ("id", "trait", "pole", "description", "system_prompt"):
        if not str(raw.get(key, "")).strip():
            raise DataError(f"{where}: missing key '{key}'")
    if not str(raw["id"]).replace("_", "").isalnum():
        raise DataError(f"{where}: id '{raw['id']}' must be letters, digits and _ (it names a PEFT adapter)")
    examples = tuple(Example(str(e["user"]), str(e["reply"])) for e in raw.get("examples", []) or [])
    return Pole(
        id=str(raw["id"]),
        trait=str(raw["trait"]),
        pole=str(raw["pole"]),
        description=str(raw["description"]).strip(),
        markers=tuple(str(m) for m in raw.get("markers", []) or []),
        system_prompt=str(raw["system_prompt"]).strip(),
        examples=examples,
    )


def _no_unknown(data: dict, allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise DataError(f"{where}: unknown key '{key}'{did_you_mean(str(key), sorted(allowed))}")
