"""The `curated` teacher: replays the curated Persona-CoT corpus instead of generating.

No strong teacher is reachable offline, and a 135M model writes replies no expert can learn a pole
from. The curated corpus (`datamodules/data/persona_replies.jsonl`) records, per situation, what a
strong teacher running Persona-CoT would write. `CuratedPersonaCoT` turns it into the same drafts
as `PersonaCoT` (cues, ratings, ten pole replies, a fused reply) and runs the same quality filters,
so the datagen records, SFT/router/joint files and dataset card have one shape whatever the teacher.
It generates nothing: every token count is 0.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from datamodules.io import ConfigError
from datamodules.persona_replies import CuratedReplies, load_persona_replies
from datamodules.personas import PersonaSet
from lightning_modules.components.persona_cot import activated_poles, finish_draft
from lightning_modules.components.quality_filters import near_duplicates, response_flags

if TYPE_CHECKING:
    from datamodules.situations import Situation


class CuratedTeacher:
    """The recorded replies of one corpus file; its id names the file and its content hash.

    Built from the config like any teacher; `bind` reads and validates the records against the
    persona set and the situations corpus (file:line errors) before the stage spends anything."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.name = self.path.name
        self.replies: dict[str, CuratedReplies] = {}

    @property
    def id(self) -> str:
        return f"curated:{self.name}@{self.digest[:12]}"

    def bind(self, personas: PersonaSet, known_ids: set[str]) -> "CuratedTeacher":
        self.replies = load_persona_replies(self.path, personas, known_ids=known_ids)
        return self

    def record(self, situation_id: str) -> CuratedReplies:
        if situation_id not in self.replies:
            raise KeyError(f"the curated teacher has no record for situation '{situation_id}'")
        return self.replies[situation_id]


def build_curated_teacher(cfg, default_model, section: str) -> CuratedTeacher:
    """The registered builder: the replies file named by `<section>.replies`."""
    if not Path(cfg.replies).is_file():
        raise ConfigError(f"key '{section}.replies': file not found: {cfg.replies}")
    return CuratedTeacher(cfg.replies)


class CuratedPersonaCoT:
    """Persona-CoT drafts from recorded output, through the live teacher's filters."""

    def __init__(self, teacher: CuratedTeacher, personas: PersonaSet, cfg) -> None:
        """cfg: the datagen config section (its filter settings), as PersonaCoT reads it."""
        self.teacher = teacher
        self.personas = personas
        self.s = cfg

    def run_batch(self, situations: Sequence[Situation], seed: int) -> list[dict]:
        """One draft per situation, in `PersonaCoT.run_batch`'s shape (the seed is unused: nothing is sampled)."""
        return [self._draft(s) for s in situations]

    def _draft(self, situation: Situation) -> dict:
        rec = self.teacher.record(situation.id)
        user = situation.user_text
        responses = {p: self._entry(rec.responses[p], user) for p in self.personas.ids}
        for pole_id in near_duplicates(rec.responses, self.s.duplicate_threshold):
            responses[pole_id]["flags"].append("duplicate")
        active = activated_poles(situation.label, self.personas, self.s.activation_threshold)
        draft = {
            "tokens_generated": 0, "cues": list(rec.cues),
            # The recorded analysis rates the poles as the curated label does: it was written from it.
            "teacher_label": dict(situation.label), "teacher_label_error": None,
            "analysis_raw": rec.activation, "analysis_attempts": 0,
            "responses": responses, "fused": {"poles": [p.id for p, _ in active], **self._entry(rec.fused, user)},
        }
        finish_draft(draft)
        return draft

    def _entry(self, text: str, user_text: str) -> dict:
        flags = response_flags(text, user_text, self.s.min_words, self.s.max_words)
        return {"text": text, "accepted": False, "flags": flags, "error": None}
