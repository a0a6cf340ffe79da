"""Persona-CoT: the prompts and steps that turn one batch of situations into persona data. No Lightning.

For each situation the teacher (a)+(b) lists the cues and rates every pole (one call), (c) replies
once per pole in that pole's voice and (d) writes a fused reply expressing the activated poles of
the curated label. Quality filters flag each response; an optional judge asks whether each pole
reply is in its pole's voice. The datagen stage (`lightning_modules/datagen.py`) drives `PersonaCoT`
from Lightning's predict loop and turns its drafts into records.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence


from datamodules.personas import PersonaSet, Pole
from datamodules.io import ConfigError, read_yaml_mapping
from lightning_modules.components.quality_filters import (
    ParseError,
    clean_response,
    near_duplicates,
    parse_analysis,
    parse_verdict,
    response_flags,
)
from lightning_modules.components.teachers import Conversation, Generation, derive_seed

if TYPE_CHECKING:  # datamodules.situations imports Lightning (its DataModule); only the type is needed here
    from datamodules.situations import Situation

_POLE = ("pole_id", "trait", "pole", "description", "markers", "system_prompt")
# Each template key and the placeholders its step fills in.
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "analysis_system": ("conversation", "poles", "pole_ids", "rating_lines"),
    "analysis_user": ("conversation", "poles", "pole_ids", "rating_lines"),
    "pole_system": (*_POLE, "word_budget"),
    "fused_system": ("activated", "cues", "word_budget"),
    "judge_system": (*_POLE, "conversation", "response"),
    "judge_user": (*_POLE, "conversation", "response"),
}
PROMPT_KEYS = tuple(PLACEHOLDERS)
# Every rejection reason a draft can carry, in the order the datagen summary counts them.
REASONS = (
    "unparseable", "generation_error", "empty", "too_short", "too_long", "incoherent",
    "duplicate", "ignores_user", "unsafe", "off_persona", "judge_unparseable",
)


# --------------------------------------------------------------------------- prompts


def transcript(messages: Sequence[dict]) -> str:
    names = {"user": "User", "assistant": "Assistant", "system": "Context"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


class PromptSet:
    """The Persona-CoT templates (from YAML, so prompts are config), rendered into conversations."""

    def __init__(self, templates: dict[str, str]) -> None:
        self.templates = dict(templates)

    @classmethod
    def load(cls, path: str | Path, overrides: Optional[dict[str, str]] = None) -> "PromptSet":
        """File templates with `overrides` on top; unknown keys or placeholders name the key and file."""
        path = Path(path)
        data = read_yaml_mapping(path, "key 'datagen.prompt_file': file", ConfigError)
        templates = {k: str(v) for k, v in data.items()}
        for source, entries in ((str(path), templates), ("datagen.prompts", overrides or {})):
            for key in entries:
                if key not in PROMPT_KEYS:
                    raise ConfigError(f"{source}: unknown prompt key '{key}' (known: {', '.join(PROMPT_KEYS)})")
        templates.update(overrides or {})
        missing = [k for k in PROMPT_KEYS if k not in templates]
        if missing:
            raise ConfigError(f"{path}: missing prompt key(s) {', '.join(missing)}")
        prompts = cls(templates)
        prompts._check_placeholders(str(path))
        return prompts

    def _check_placeholders(self, source: str) -> None:
        for key, template in self.templates.items():
            try:
                template.format(**dict.fromkeys(PLACEHOLDERS[key], "x"))
            except KeyError as err:
                raise ConfigError(
                    f"{source}: prompt '{key}' uses unknown placeholder {{{err.args[0]}}} "
                    f"(it may use {', '.join('{' + n + '}' for n in PLACEHOLDERS[key])})"
                ) from None
            except (ValueError, IndexError) as err:
                raise ConfigError(f"{source}: prompt '{key}' is not a valid format string ({err})") from None

    def render(self, key: str, **values: Any) -> str:
        return self.templates[key].format(**values)

    def analysis(self, situation: Situation, personas: PersonaSet) -> Conversation:
        values = {
            "conversation": transcript(situation.messages), "pole_ids": ", ".join(personas.ids),
            "poles": "\n".join(f"- {p.id} ({p.trait}, {p.pole}): {p.description}" for p in personas.poles),
            "rating_lines": "\n".join(f"{p}: N" for p in personas.ids),
        }
        return self._system_user("analysis", values)

    def pole(self, situation: Situation, pole: Pole, word_budget: int) -> Conversation:
        return _in_conversation(self.render("pole_system", **_pole_fields(pole), word_budget=word_budget), situation)

    def fused(self, situation: Situation, activated: list[tuple[Pole, float]], cues, word_budget: int) -> Conversation:
        lines = "\n".join(f"- {p.id} ({w:.2f}): {p.description}" for p, w in activated)
        text = "; ".join(cues) if cues else "(not available)"
        return _in_conversation(self.render("fused_system", activated=lines, cues=text, word_budget=word_budget), situation)

    def judge(self, situation: Situation, pole: Pole, response: str) -> Conversation:
        values = {**_pole_fields(pole), "conversation": transcript(situation.messages), "response": response}
        return self._system_user("judge", values)

    def _system_user(self, step: str, values: dict[str, str]) -> Conversation:
        """A fresh two-turn conversation from the `<step>_system` and `<step>_user` templates."""
        return [{"role": "system", "content": self.render(f"{step}_system", **values)},
                {"role": "user", "content": self.render(f"{step}_user", **values)}]


def _pole_fields(pole: Pole) -> dict[str, str]:
    return {"pole_id": pole.id, "trait": pole.trait, "pole": pole.pole, "description": pole.description,
            "markers": "; ".join(pole.markers), "system_prompt": pole.system_prompt}


def _in_conversation(system: str, situation: Situation) -> Conversation:
    """Our system prompt (plus the situation's own, if any), then the situation's turns."""
    own = [m["content"] for m in situation.messages if m["role"] == "system"]
    turns = [dict(m) for m in situation.messages if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join([system, *own])}, *turns]


def activated_poles(label: dict[str, float], personas: PersonaSet, threshold: float) -> list[tuple[Pole, float]]:
    """Poles at or above the threshold, strongest first; at least the strongest one."""
    ranked = sorted(personas.poles, key=lambda p: (-label[p.id], personas.index(p.id)))
    chosen = [p for p in ranked if label[p.id] >= threshold] or ranked[:1]
    return [(p, label[p.id]) for p in chosen]


# --------------------------------------------------------------------------- the Persona-CoT steps


class PersonaCoT:
    """Steps (a)-(d), the filters and the optional judge for one batch of situations. No Lightning.

    cfg: the datagen config section (DatagenConfig: parse_retries, min_words, ..., and teacher with
    max_new_tokens and temperature), read as it is rather than copied into a settings type.
    """

    def __init__(self, teacher: Any, personas: PersonaSet, prompts: PromptSet, cfg: Any) -> None:
        self.teacher = teacher
        self.personas = personas
        self.prompts = prompts
        self.cfg = cfg
        self.max_new_tokens, self.temperature = cfg.teacher.max_new_tokens, cfg.teacher.temperature
        # Ask for what fits the token budget (~0.75 words per token), so replies end on their own.
        self.word_budget = max(1, min(cfg.max_words, self.max_new_tokens * 3 // 4))

    def run_batch(self, situations: Sequence[Situation], seed: int) -> list[dict]:
        """One dict per situation: cues, teacher label, pole and fused responses with flags, tokens."""
        drafts = [{"tokens_generated": 0} for _ in situations]
        self._analyse(situations, drafts, seed)
        self._pole_responses(situations, drafts, seed)
        self._fused(situations, drafts, seed)
        if self.cfg.judge:
            self._judge(situations, drafts, seed)
        for draft in drafts:
            finish_draft(draft)
        return drafts

    def _retrying(self, step: str, convs: list[Conversation], read, drafts, owners, seed, max_tokens, temperature):
        """Generate, read each answer with `read` (raises ParseError), re-ask the unreadable ones.

        `owners[i]` is the draft whose token count conversation i adds to.
        """
        results: dict[int, tuple[Any, Optional[str], str, int]] = {}
        todo = list(range(len(convs)))
        for attempt in range(self.cfg.parse_retries + 1):
            if not todo:
                break
            # A greedy retry would repeat the same answer: retries sample.
            temp = temperature if attempt == 0 or temperature > 0 else self.cfg.retry_temperature
            gens = self.teacher.generate([convs[i] for i in todo], max_tokens, temp, derive_seed(seed, step, attempt))
            retry = []
            for i, gen in zip(todo, gens):
                drafts[owners[i]]["tokens_generated"] += gen.tokens
                results[i] = _read(gen, read, attempt + 1)
                if results[i][1] and not gen.error:  # the HTTP teacher already retried its failures
                    retry.append(i)
            todo = retry
        return [results[i] for i in range(len(convs))]

    def _analyse(self, situations, drafts, seed) -> None:
        convs = [self.prompts.analysis(s, self.personas) for s in situations]
        # The rating lines alone take ~7 tokens per pole, whatever the reply budget is.
        budget = self.cfg.analysis_max_new_tokens or 10 * len(self.personas.ids) + 64
        read = lambda text: parse_analysis(text, self.personas.ids)  # noqa: E731
        owners = list(range(len(situations)))
        results = self._retrying("analysis", convs, read, drafts, owners, seed, budget, self.temperature)
        for draft, (value, error, raw, attempts) in zip(drafts, results):
            draft.update(cues=value.cues if value else None, teacher_label=value.ratings if value else None,
                         teacher_label_error=error, analysis_raw=raw[:2000], analysis_attempts=attempts)

    def _pole_responses(self, situations, drafts, seed) -> None:
        convs = [self.prompts.pole(s, p, self.word_budget) for s in situations for p in self.personas.poles]
        gens = iter(self.teacher.generate(convs, self.max_new_tokens, self.temperature, derive_seed(seed, "pole")))
        for situation, draft in zip(situations, drafts):
            draft["responses"] = {p.id: self._response(next(gens), situation, draft) for p in self.personas.poles}
            texts = {k: r["text"] for k, r in draft["responses"].items()}
            for pole_id in near_duplicates(texts, self.cfg.duplicate_threshold):
                draft["responses"][pole_id]["flags"].append("duplicate")

    def _fused(self, situations, drafts, seed) -> None:
        chosen = [activated_poles(s.label, self.personas, self.cfg.activation_threshold) for s in situations]
        convs = [self.prompts.fused(s, a, d["cues"], self.word_budget) for s, a, d in zip(situations, chosen, drafts)]
        gens = self.teacher.generate(convs, self.max_new_tokens, self.temperature, derive_seed(seed, "fused"))
        for situation, draft, active, gen in zip(situations, drafts, chosen, gens):
            draft["fused"] = {"poles": [p.id for p, _ in active], **self._response(gen, situation, draft)}

    def _response(self, gen: Generation, situation: Situation, draft: dict) -> dict:
        draft["tokens_generated"] += gen.tokens
        if gen.error:
            return {"text": "", "accepted": False, "flags": ["generation_error"], "error": gen.error}
        text = clean_response(gen.text, gen.finished)
        flags = response_flags(text, situation.user_text, self.cfg.min_words, self.cfg.max_words)
        return {"text": text, "accepted": False, "flags": flags, "error": None}

    def _judge(self, situations, drafts, seed) -> None:
        """Ask whether each so-far accepted pole reply expresses its pole; NO -> off_persona."""
        jobs = [(i, p) for i, d in enumerate(drafts) for p in self.personas.poles if not d["responses"][p.id]["flags"]]
        convs = [self.prompts.judge(situations[i], p, drafts[i]["responses"][p.id]["text"]) for i, p in jobs]
        results = self._retrying("judge", convs, parse_verdict, drafts, [i for i, _ in jobs], seed, 8, 0.0)
        for draft in drafts:
            for entry in draft["responses"].values():
                entry["judge"] = None  # not judged: already rejected by another filter
        for (i, pole), (verdict, error, _, _) in zip(jobs, results):
            entry = drafts[i]["responses"][pole.id]
            entry["judge"] = None if error else ("yes" if verdict else "no")
            if error:
                entry["flags"].append("generation_error" if error.startswith("generation_error") else "judge_unparseable")
            elif not verdict:
                entry["flags"].append("off_persona")


def _read(gen: Generation, read, attempts: int) -> tuple[Any, Optional[str], str, int]:
    """(value, error, raw text, attempts); the error starts with the REASONS key it counts under."""
    if gen.error:
        return None, f"generation_error: {gen.error}", "", attempts
    try:
        return read(gen.text), None, gen.text, attempts
    except ParseError as err:
        return None, f"unparseable: {err}", gen.text, attempts


def error_reason(error: str) -> str:
    """The REASONS key an analysis error (`teacher_label_error`) counts under."""
    return error.split(":", 1)[0]


def finish_draft(draft: dict) -> None:
    """Accepted = no flag; the item's flags are every reason found in it."""
    flags: set[str] = set()
    if draft["teacher_label_error"]:
        flags.add(error_reason(draft["teacher_label_error"]))
    for entry in [*draft["responses"].values(), draft["fused"]]:
        entry["accepted"] = not entry["flags"]
        flags.update(entry["flags"])
    draft["flags"] = sorted(flags)
