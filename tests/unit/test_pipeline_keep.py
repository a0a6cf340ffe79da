"""Pipeline bookkeeping that must never lose work: superseded stage folders are all kept."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.config import load_config
from experiments.pipeline import reset_stages

ROOT = Path(__file__).resolve().parents[2]


def _finished_stage(out: Path, stage: str, stage_hash: str, marker: str) -> None:
    """A stage folder as a finished run leaves it: state.json plus one output file."""
    (out / stage).mkdir(parents=True, exist_ok=True)
    (out / stage / "state.json").write_text(json.dumps({"hash": stage_hash, "run_id": "r", "complete": True}))
    (out / stage / "output.txt").write_text(marker)


def test_every_superseded_folder_is_kept_across_repeated_resets_and_toggles(tmp_path):
    """A second reset under the same config (same hash), and a config toggled A -> B -> A, each set a
    folder aside whose name is already taken: the new one gets -2, -3, ...; none is replaced."""
    out = tmp_path / "out"
    cfg = load_config(ROOT / "experiments/smoke.yaml", [f"output_dir={out}", "stages=[router]"])
    for marker, stage_hash in (("first", "aaaaaaaa11"), ("second", "aaaaaaaa11"), ("third", "bbbbbbbb22"),
                               ("fourth", "aaaaaaaa11")):
        _finished_stage(out, "router", stage_hash, marker)
        assert reset_stages(cfg, "router") == ["router"]
    kept = {p.name: (p / "output.txt").read_text() for p in out.glob("router.superseded-*")}
    assert kept == {"router.superseded-aaaaaaaa": "first", "router.superseded-aaaaaaaa-2": "second",
                    "router.superseded-bbbbbbbb": "third", "router.superseded-aaaaaaaa-3": "fourth"}
    assert not (out / "router" / "state.json").exists()
