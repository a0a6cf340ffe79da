"""Stage `datagen`: Persona-CoT data generation with a local or OpenAI-compatible teacher.

    personafuse run experiments/quickstart.yaml            # with `datagen` in stages
    personafuse run my.yaml datagen.limit=16 datagen.teacher.kind=openai \
        datagen.teacher.base_url=http://127.0.0.1:8000/v1 datagen.teacher.model=meta-llama/Llama-3.1-70B-Instruct

For each situation the teacher (a)+(b) lists the cues and rates every pole (one call), (c) replies
once per pole in that pole's voice and (d) writes a fused reply expressing the activated poles of
the curated label. Quality filters flag each response; every reason is counted.

Resumable: batches are fixed over the id-sorted items and seeded from (seed, batch index); each
finished situation is written to items/<id>.json, so a rerun after a crash regenerates only batches
with a missing item and the final files are byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import yaml

from datamodules.io import DataError, atomic_write_text, read_json, write_jsonl
from datamodules.personas import PersonaSet, Pole, load_personas
from datamodules.situations import (
    Situation,
    SituationsDataModule,
    load_situations,
    select_items,
    split_of,
    split_situations,
    write_dataset_card,
)
from experiments.config import ConfigError, ExperimentConfig, config_hash, project_path, to_container
from lightning_modules.components.teachers import (
    Generation,
    ParseError,
    build_teacher,
    clean_response,
    derive_seed,
    near_duplicates,
    parse_analysis,
    parse_verdict,
    response_flags,
    teacher_id,
)

SCHEMA_VERSION = 1
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
REASONS = (
    "unparseable", "generation_error", "empty", "too_short", "too_long", "incoherent",
    "duplicate", "ignores_user", "unsafe", "off_persona", "judge_unparseable",
)
# Transport settings change how a request is sent, not what is generated: not part of the cache key.
_TRANSPORT_KEYS = ("max_concurrency", "timeout_s", "max_retries", "backoff_s")
Conversation = list[dict[str, str]]


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
        if not path.is_file():
            raise ConfigError(f"key 'datagen.prompt_file': file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
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
        return [{"role": "system", "content": self.render("analysis_system", **values)},
                {"role": "user", "content": self.render("analysis_user", **values)}]

    def pole(self, situation: Situation, pole: Pole, word_budget: int) -> Conversation:
        return _in_conversation(self.render("pole_system", **_pole_fields(pole), word_budget=word_budget), situation)

    def fused(self, situation: Situation, activated: list[tuple[Pole, float]], cues, word_budget: int) -> Conversation:
        lines = "\n".join(f"- {p.id} ({w:.2f}): {p.description}" for p, w in activated)
        text = "; ".join(cues) if cues else "(not available)"
        return _in_conversation(self.render("fused_system", activated=lines, cues=text, word_budget=word_budget), situation)

    def judge(self, situation: Situation, pole: Pole, response: str) -> Conversation:
        values = {**_pole_fields(pole), "conversation": transcript(situation.messages), "response": response}
        return [{"role": "system", "content": self.render("judge_system", **values)},
                {"role": "user", "content": self.render("judge_user", **values)}]


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


@dataclass(frozen=True)
class CoTSettings:
    max_new_tokens: int = 96
    temperature: float = 0.7
    retry_temperature: float = 0.7
    parse_retries: int = 1
    min_words: int = 3
    max_words: int = 220
    duplicate_threshold: float = 0.9
    judge: bool = False
    activation_threshold: float = 0.5
    analysis_max_new_tokens: Optional[int] = None

    @property
    def word_budget(self) -> int:
        # Ask for what fits the token budget (~0.75 words per token), so replies end on their own.
        return max(1, min(self.max_words, self.max_new_tokens * 3 // 4))


class PersonaCoT:
    """Steps (a)-(d), the filters and the optional judge for one batch of situations. No Lightning."""

    def __init__(self, teacher: Any, personas: PersonaSet, prompts: PromptSet, settings: CoTSettings) -> None:
        self.teacher = teacher
        self.personas = personas
        self.prompts = prompts
        self.s = settings

    def run_batch(self, situations: Sequence[Situation], seed: int) -> list[dict]:
        """One dict per situation: cues, teacher label, pole and fused responses with flags, tokens."""
        drafts = [{"tokens_generated": 0} for _ in situations]
        self._analyse(situations, drafts, seed)
        self._pole_responses(situations, drafts, seed)
        self._fused(situations, drafts, seed)
        if self.s.judge:
            self._judge(situations, drafts, seed)
        for draft in drafts:
            _finish(draft)
        return drafts

    def _retrying(self, step: str, convs: list[Conversation], read, drafts, owners, seed, max_tokens, temperature):
        """Generate, read each answer with `read` (raises ParseError), re-ask the unreadable ones.

        `owners[i]` is the draft whose token count conversation i adds to.
        """
        results: dict[int, tuple[Any, Optional[str], str, int]] = {}
        todo = list(range(len(convs)))
        for attempt in range(self.s.parse_retries + 1):
            if not todo:
                break
            # A greedy retry would repeat the same answer: retries sample.
            temp = temperature if attempt == 0 or temperature > 0 else self.s.retry_temperature
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
        budget = self.s.analysis_max_new_tokens or 10 * len(self.personas.ids) + 64
        read = lambda text: parse_analysis(text, self.personas.ids)  # noqa: E731
        owners = list(range(len(situations)))
        results = self._retrying("analysis", convs, read, drafts, owners, seed, budget, self.s.temperature)
        for draft, (value, error, raw, attempts) in zip(drafts, results):
            draft.update(cues=value.cues if value else None, teacher_label=value.ratings if value else None,
                         teacher_label_error=error, analysis_raw=raw[:2000], analysis_attempts=attempts)

    def _pole_responses(self, situations, drafts, seed) -> None:
        convs = [self.prompts.pole(s, p, self.s.word_budget) for s in situations for p in self.personas.poles]
        gens = iter(self.teacher.generate(convs, self.s.max_new_tokens, self.s.temperature, derive_seed(seed, "pole")))
        for situation, draft in zip(situations, drafts):
            draft["responses"] = {p.id: self._response(next(gens), situation, draft) for p in self.personas.poles}
            texts = {k: r["text"] for k, r in draft["responses"].items()}
            for pole_id in near_duplicates(texts, self.s.duplicate_threshold):
                draft["responses"][pole_id]["flags"].append("duplicate")

    def _fused(self, situations, drafts, seed) -> None:
        chosen = [activated_poles(s.label, self.personas, self.s.activation_threshold) for s in situations]
        convs = [self.prompts.fused(s, a, d["cues"], self.s.word_budget) for s, a, d in zip(situations, chosen, drafts)]
        gens = self.teacher.generate(convs, self.s.max_new_tokens, self.s.temperature, derive_seed(seed, "fused"))
        for situation, draft, active, gen in zip(situations, drafts, chosen, gens):
            draft["fused"] = {"poles": [p.id for p, _ in active], **self._response(gen, situation, draft)}

    def _response(self, gen: Generation, situation: Situation, draft: dict) -> dict:
        draft["tokens_generated"] += gen.tokens
        if gen.error:
            return {"text": "", "accepted": False, "flags": ["generation_error"], "error": gen.error}
        text = clean_response(gen.text, gen.finished)
        flags = response_flags(text, situation.user_text, self.s.min_words, self.s.max_words)
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


def _finish(draft: dict) -> None:
    """Accepted = no flag; the item's flags are every reason found in it."""
    flags: set[str] = set()
    if draft["teacher_label_error"]:
        flags.add(draft["teacher_label_error"].split(":", 1)[0])
    for entry in [*draft["responses"].values(), draft["fused"]]:
        entry["accepted"] = not entry["flags"]
        flags.update(entry["flags"])
    draft["flags"] = sorted(flags)


# --------------------------------------------------------------------------- items cache


def make_record(situation: Situation, generated: dict, split: str, chash: str, teacher: str) -> dict:
    """One persona_data line; keys in a fixed order so the file is byte-stable."""
    return {
        "schema_version": SCHEMA_VERSION, "config_hash": chash, "teacher": teacher,
        "id": situation.id, "domain": situation.domain, "split": split, "messages": situation.conversation(),
        "cues": generated["cues"], "teacher_label": generated["teacher_label"],
        "teacher_label_error": generated["teacher_label_error"], "label": dict(situation.label),
        "responses": generated["responses"], "fused": generated["fused"], "flags": generated["flags"],
        "analysis_raw": generated["analysis_raw"], "analysis_attempts": generated["analysis_attempts"],
        "tokens_generated": generated["tokens_generated"],
    }


def read_item(items_dir: Path, item_id: str, chash: str) -> Optional[dict]:
    """The cached record, or None when missing or made by another config."""
    try:
        record = read_json(items_dir / f"{item_id}.json")
    except DataError:  # unreadable: cannot happen with atomic writes, but regenerate rather than fail
        return None
    return record if record and record.get("config_hash") == chash else None


def pending_batches(data: SituationsDataModule, items_dir: Path, chash: str) -> set[int]:
    return {index for index, items in data.batches() if any(read_item(items_dir, s.id, chash) is None for s in items)}


class DatagenModule(L.LightningModule):
    """Persona-CoT in Lightning's predict loop: each rank takes whole batches and writes their items."""

    def __init__(self, cot: PersonaCoT, items_dir: Path, config_hash: str, splits: dict[str, str], seed: int) -> None:
        super().__init__()
        self.cot = cot
        model = getattr(cot.teacher, "model", None)
        if isinstance(model, torch.nn.Module):
            self.teacher_model = model  # a registered submodule, so Lightning puts it on this rank's device
        self.items_dir = Path(items_dir)
        self.config_hash = config_hash
        self.splits = splits
        self.seed = seed
        self.tokens = 0
        self.written = 0
        self.totals = {"tokens": 0, "written": 0}

    def predict_step(self, batch: tuple[int, list[Situation]], batch_idx: int) -> dict:
        index, situations = batch
        generated = self.cot.run_batch(situations, derive_seed(self.seed, "batch", index))
        written = 0
        for situation, gen in zip(situations, generated):
            if read_item(self.items_dir, situation.id, self.config_hash) is None:
                record = make_record(situation, gen, self.splits[situation.id], self.config_hash, self.cot.teacher.id)
                atomic_write_text(self.items_dir / f"{situation.id}.json", json.dumps(record, ensure_ascii=False))
                written += 1
        self.tokens += sum(g["tokens_generated"] for g in generated)
        self.written += written
        return {"batch": index, "written": written}

    def on_predict_epoch_end(self) -> None:
        local = torch.tensor([float(self.tokens), float(self.written)], device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        self.totals = {"tokens": int(total[0].item()), "written": int(total[1].item())}


# --------------------------------------------------------------------------- the stage


def run(ctx) -> dict:
    """Generate (or resume) persona data for cfg.datagen.split, then write and log the datasets."""
    cfg: ExperimentConfig = ctx.cfg
    personas_path, corpus_path = project_path(cfg.personas.file), project_path(cfg.data.situations)
    personas = load_personas(personas_path)
    corpus = load_situations(corpus_path, personas, cfg.data.on_bad_line)
    splits = split_situations(corpus, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    selected = select_items(_split_items(splits, cfg.datagen.split), cfg.datagen.limit, cfg.datagen.seed)
    prompts = PromptSet.load(project_path(cfg.datagen.prompt_file), cfg.datagen.prompts)
    chash = datagen_hash(cfg, personas_path, corpus_path, prompts)
    items_dir = ctx.stage_dir / "items"
    data = SituationsDataModule(selected, cfg.datagen.teacher.batch_size)
    data.only = pending_batches(data, items_dir, chash)
    stats = {"tokens": 0, "written": 0, "seconds": 0.0}
    if data.only:
        module = DatagenModule(_cot(cfg, personas, prompts), items_dir, chash, split_of(splits), cfg.datagen.seed)
        trainer = _trainer(cfg)
        started = time.time()
        trainer.predict(module, datamodule=data, return_predictions=False)
        trainer.strategy.barrier()  # every rank's items are on disk before rank 0 assembles them
        stats = {**module.totals, "seconds": time.time() - started}
        if trainer.global_rank != 0:
            return {}
    records = [read_item(items_dir, s.id, chash) for s in data.items]
    missing = [s.id for s, r in zip(data.items, records) if r is None]
    if missing:
        raise RuntimeError(f"datagen finished without items for {', '.join(missing[:5])} (in {items_dir})")
    return _write_outputs(ctx, records, splits, personas, chash, stats)


def _split_items(splits: dict[str, list[Situation]], name: str) -> list[Situation]:
    if name == "all":
        return [s for group in splits.values() for s in group]
    if name not in splits:
        raise ConfigError(f"key 'datagen.split': '{name}' is not one of train, val, test, all")
    return splits[name]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datagen_hash(cfg: ExperimentConfig, personas_path: Path, corpus_path: Path, prompts: PromptSet) -> str:
    """What the generated records depend on: datagen settings, prompt texts, teacher model, inputs' bytes."""
    datagen = to_container(cfg.datagen)
    for key in _TRANSPORT_KEYS:
        datagen["teacher"].pop(key)
    datagen["prompts"] = prompts.templates
    datagen.pop("prompt_file")
    payload = {
        "schema_version": SCHEMA_VERSION, "datagen": datagen,
        "data": {k: getattr(cfg.data, k) for k in ("val_fraction", "test_fraction", "split_seed", "on_bad_line")},
        "personas": _file_digest(personas_path), "corpus": _file_digest(corpus_path),
        "teacher": teacher_id(cfg.datagen.teacher, cfg.model),
    }
    if cfg.datagen.teacher.kind == "local":
        payload["model"] = {"dtype": cfg.model.dtype, "revision": cfg.model.revision if not cfg.datagen.teacher.model else None}
    return config_hash(payload)


def _cot(cfg: ExperimentConfig, personas: PersonaSet, prompts: PromptSet) -> PersonaCoT:
    d, t = cfg.datagen, cfg.datagen.teacher
    settings = CoTSettings(
        max_new_tokens=t.max_new_tokens, temperature=t.temperature, retry_temperature=d.retry_temperature,
        parse_retries=d.parse_retries, min_words=d.min_words, max_words=d.max_words,
        duplicate_threshold=d.duplicate_threshold, judge=d.judge, activation_threshold=d.activation_threshold,
        analysis_max_new_tokens=d.analysis_max_new_tokens,
    )
    return PersonaCoT(build_teacher(t, cfg.model), personas, prompts, settings)


def _trainer(cfg: ExperimentConfig) -> L.Trainer:
    """Local teacher: the configured devices split the batches. HTTP teacher: one CPU process is enough."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_modules.common import build_strategy

    t = cfg.trainer
    local = cfg.datagen.teacher.kind == "local"
    accelerator = "cpu" if t.strategy == "ddp_cpu" or not local else t.accelerator
    # Sharded training strategies (FSDP, DeepSpeed) buy nothing for inference: "auto" replicates the
    # teacher per device (DDP when there are several). Too big a teacher belongs behind an HTTP server.
    strategy = build_strategy(t.strategy, accelerator) if local and t.strategy in ("ddp", "ddp_cpu") else "auto"
    return L.Trainer(
        accelerator=accelerator, devices=t.devices if local else 1, num_nodes=t.num_nodes if local else 1,
        strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[TQDMProgressBar(refresh_rate=1)], default_root_dir=str(cfg.output_dir),
    )


# --------------------------------------------------------------------------- outputs


def sft_rows(records: list[dict]) -> list[dict]:
    """Accepted pole responses, for the adapter_sft stage."""
    return [
        {"messages": r["messages"], "response": entry["text"], "pole": pole}
        for r in records for pole, entry in r["responses"].items() if entry["accepted"]
    ]


def joint_rows(records: list[dict]) -> list[dict]:
    """Accepted fused responses with the curated label, for the joint stage."""
    return [{"messages": r["messages"], "response": r["fused"]["text"], "label": r["label"]} for r in records if r["fused"]["accepted"]]


def router_rows(splits: dict[str, list[Situation]]) -> list[dict]:
    """Curated labels of the whole corpus (every split): the router trains and is tested on these."""
    rows = [
        {"id": s.id, "domain": s.domain, "split": name, "messages": s.conversation(), "label": dict(s.label)}
        for name, group in splits.items() for s in group
    ]
    return sorted(rows, key=lambda row: row["id"])


def summarise(records: list[dict], stats: dict) -> dict:
    """Counts per rejection reason, acceptance rates, teacher/curated label agreement, throughput."""
    entries = [e for r in records for e in r["responses"].values()]
    fused = [r["fused"] for r in records]
    rejected = dict.fromkeys(REASONS, 0)
    for entry in entries + fused:
        for flag in entry["flags"]:
            rejected[flag] = rejected.get(flag, 0) + 1
    for r in records:
        if r["teacher_label_error"]:
            reason = r["teacher_label_error"].split(":", 1)[0]
            rejected[reason] = rejected.get(reason, 0) + 1
    accepted = sum(e["accepted"] for e in entries + fused)
    return {
        "items": len(records),
        "responses": len(entries) + len(fused),
        "accepted": accepted,
        "acceptance_rate": accepted / max(1, len(entries) + len(fused)),
        "pole_acceptance_rate": sum(e["accepted"] for e in entries) / max(1, len(entries)),
        "fused_acceptance_rate": sum(e["accepted"] for e in fused) / max(1, len(fused)),
        "analysis_parse_rate": sum(r["teacher_label"] is not None for r in records) / max(1, len(records)),
        "teacher_label_mae": _label_mae(records),
        "rejected": rejected,
        "tokens_generated": sum(r["tokens_generated"] for r in records),
        "this_run": {"items_written": stats["written"], "tokens": stats["tokens"], "seconds": round(stats["seconds"], 3),
                     "tokens_per_s": stats["tokens"] / stats["seconds"] if stats["seconds"] else None},
    }


def _label_mae(records: list[dict]) -> Optional[float]:
    """Mean |teacher rating - curated label| over parsed analyses: how far the teacher agrees with the corpus."""
    diffs = [abs(r["teacher_label"][k] - v) for r in records if r["teacher_label"] for k, v in r["label"].items()]
    return sum(diffs) / len(diffs) if diffs else None


def _write_outputs(ctx, records, splits, personas, chash, stats) -> dict:
    d = ctx.stage_dir
    files = {"persona_data": d / "persona_data.jsonl", "sft": d / "sft.jsonl", "router": d / "router.jsonl", "joint": d / "joint.jsonl"}
    write_jsonl(files["persona_data"], records)
    rows = {"sft": sft_rows(records), "router": router_rows(splits), "joint": joint_rows(records)}
    for name, data in rows.items():
        write_jsonl(files[name], data)
    dataset_hash = _file_digest(files["persona_data"])
    teacher = records[0]["teacher"] if records else teacher_id(ctx.cfg.datagen.teacher, ctx.cfg.model)
    summary = {"schema_version": SCHEMA_VERSION, "config_hash": chash, "dataset_hash": dataset_hash, "teacher": teacher,
               "split": ctx.cfg.datagen.split, **summarise(records, stats), "rows": {k: len(v) for k, v in rows.items()}}
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_card(d / "dataset_card.md", ctx.cfg, summary, personas)
    _log(ctx, summary, [*files.values(), d / "summary.json", d / "dataset_card.md"])
    return {**{k: str(v) for k, v in files.items()}, "summary": summary}


def _log(ctx, summary: dict, paths: list[Path]) -> None:
    metrics = {f"datagen/{k}": summary[k] for k in ("items", "acceptance_rate", "pole_acceptance_rate",
               "fused_acceptance_rate", "analysis_parse_rate", "tokens_generated")}
    metrics.update({f"datagen/rejected/{k}": v for k, v in summary["rejected"].items()})
    metrics.update({f"datagen/sft_rows": summary["rows"]["sft"], "datagen/joint_rows": summary["rows"]["joint"]})
    if summary["teacher_label_mae"] is not None:
        metrics["datagen/teacher_label_mae"] = summary["teacher_label_mae"]
    if summary["this_run"]["tokens_per_s"] is not None:
        metrics["datagen/tokens_per_s"] = summary["this_run"]["tokens_per_s"]
    ctx.log_metrics(metrics)
    ctx.set_tags({"dataset_hash": summary["dataset_hash"], "teacher": summary["teacher"], "datagen_config_hash": summary["config_hash"]})
    for path in paths:
        ctx.log_artifact(path, "datagen")


def _write_card(path: Path, cfg: ExperimentConfig, summary: dict, personas: PersonaSet) -> None:
    write_dataset_card(
        path,
        title=f"Persona-CoT data — {cfg.name}",
        purpose=_CARD_PURPOSE,
        fields=_CARD_FIELDS,
        counts={"situations": summary["items"], "responses": summary["responses"], "accepted": summary["accepted"],
                "acceptance rate": f"{summary['acceptance_rate']:.3f}", "rejected": summary["rejected"], "rows": summary["rows"],
                "tokens generated": summary["tokens_generated"]},
        provenance={"teacher": summary["teacher"], "persona set": f"{personas.name} ({cfg.personas.file})",
                    "corpus": f"{cfg.data.situations}, split '{cfg.datagen.split}', limit {cfg.datagen.limit}",
                    "prompts": cfg.datagen.prompt_file + (" + overrides" if cfg.datagen.prompts else ""),
                    "schema version": str(SCHEMA_VERSION), "config hash": summary["config_hash"],
                    "dataset hash (sha256 of persona_data.jsonl)": summary["dataset_hash"]},
        notes={"Quality filters": _CARD_FILTERS, "Intended use and limits": _CARD_LIMITS},
    )


_CARD_PURPOSE = """Training data for the PersonaFuse persona experts and router, written by a teacher LLM with
Persona-CoT: for each situation of the corpus the teacher lists the situational cues, rates the
activation of every persona pole (Trait Activation Theory), replies once in each pole's voice and
writes a fused reply that expresses the poles the curated label activates."""

_CARD_FIELDS = {
    "persona_data.jsonl": "one record per situation, sorted by id (all fields below)",
    "schema_version / config_hash": "record layout version; hash of every setting and input the record depends on",
    "teacher": "the teacher id (backend, model, endpoint without credentials)",
    "id / domain / split / messages": "the situation, copied from the corpus",
    "cues / teacher_label": "the teacher's cues and 0-1 pole ratings, or null with `teacher_label_error`",
    "label": "the corpus's curated activation label (used for the fused prompt, the router and joint tuning)",
    "responses": "pole id -> {text, accepted, flags, error}; accepted means no flag",
    "fused": "{poles asked for, text, accepted, flags, error}",
    "flags": "every rejection reason found in the record",
    "sft.jsonl": "{messages, response, pole}: accepted pole responses",
    "router.jsonl": "{id, domain, split, messages, label}: curated labels of every split of the corpus",
    "joint.jsonl": "{messages, response, label}: accepted fused responses",
}

_CARD_FILTERS = """Each response is checked on its own, then against the other poles of its situation:
- `unparseable`: the analysis (cues + ratings) did not follow the line format after `datagen.parse_retries` retries;
- `generation_error`: the teacher returned nothing (HTTP failure after retries), with the reason in `error`;
- `empty`, `too_short`, `too_long`: fewer than `min_words` or more than `max_words` words;
- `incoherent`: not English prose (under 15% function words, or a phrase looping), e.g. a broken teacher;
- `duplicate`: token-set Jaccard >= `duplicate_threshold` with another pole's response (both are flagged);
- `ignores_user`: no content word shared with the user's messages and generic (a stock phrase or < 5 content words);
- `unsafe`: a simple regex list (encouraging self-harm, abuse, weapon recipes, stopping medication) — it
  catches blatant failures only;
- `off_persona` / `judge_unparseable`: with `datagen.judge`, the teacher judged the reply not in its pole's voice, or gave no YES/NO."""

_CARD_LIMITS = """For training and studying situation-adaptive persona experts. Replies are model-written and only as
good as the teacher: a small local teacher (SmolLM2-135M) exercises the pipeline rather than producing
useful data. The filters are heuristics, not a safety review; do not use the replies as advice."""
