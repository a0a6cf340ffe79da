"""Stage `datagen`: Persona-CoT data generation with a local or OpenAI-compatible teacher.

    personafuse run experiments/quickstart.yaml            # with `datagen` in stages
    personafuse run my.yaml datagen.limit=16 datagen.teacher.kind=openai \
        datagen.teacher.base_url=http://127.0.0.1:8000/v1 datagen.teacher.model=meta-llama/Llama-3.1-70B-Instruct

The steps (cues and ratings, one reply per pole, a fused reply, filters, optional judge) live in
`components/persona_cot.py`; this module runs them in Lightning's predict loop and writes the datasets.

Resumable: batches are fixed over the id-sorted items and seeded from (seed, batch index); each
finished situation is written to items/<id>.json, so a rerun after a crash regenerates only batches
with a missing item and the final files are byte-identical to an uninterrupted run. An item the
teacher did not answer (`generation_error`: down, timing out, refusing the key) is not done: the
rerun generates it, and only it, again. Items rejected by the quality filters are done.

Honest: the stage fails (StageFailed, exit 1) when more than `max_error_fraction` of the replies got
no answer, or fewer than `min_accepted_fraction` passed the filters; the outputs are still written
for inspection, but the stage stays incomplete so later stages never train on them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import lightning as L
import torch

from datamodules.io import ConfigError, DataError, StageFailed, atomic_write_text, config_hash, read_json, to_container, write_jsonl
from datamodules.persona_replies import refuse_held_out
from datamodules.personas import PersonaSet, load_personas
from datamodules.situations import (
    Situation,
    SituationsDataModule,
    load_situations,
    select_items,
    split_of,
    split_situations,
    write_dataset_card,
)
from lightning_modules.components.persona_cot import REASONS, PersonaCoT, PromptSet, error_reason
from lightning_modules.components.curated_teacher import CuratedPersonaCoT, CuratedTeacher
from lightning_modules.components.registries import DATAGEN_NOT_CONTENT
from lightning_modules.components.teachers import build_teacher, derive_seed, teacher_id

if TYPE_CHECKING:  # annotations only: stages get typed config sections, never import experiments/
    from experiments.config import ExperimentConfig

SCHEMA_VERSION = 1


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


def is_done(record: Optional[dict]) -> bool:
    """Cached and answered: an item the teacher did not answer (a transient failure) is retried."""
    return record is not None and "generation_error" not in record["flags"]


def pending_batches(data: SituationsDataModule, items_dir: Path, chash: str) -> dict[int, list[Situation]]:
    """Batch index -> what to generate: a batch with a missing item whole (so a resumed run is
    byte-identical to an uninterrupted one), else only its items that the teacher did not answer."""
    todo = {}
    for index, items in data.batches():
        records = [read_item(items_dir, s.id, chash) for s in items]
        if any(r is None for r in records):
            todo[index] = items
        elif not all(map(is_done, records)):
            todo[index] = [s for s, r in zip(items, records) if not is_done(r)]
    return todo


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
        if not situations:  # padding: more ranks than pending batches
            return {"batch": index, "written": 0}
        generated = self.cot.run_batch(situations, derive_seed(self.seed, "batch", index))
        written = 0
        for situation, gen in zip(situations, generated):
            if not is_done(read_item(self.items_dir, situation.id, self.config_hash)):
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
    if cfg.datagen.teacher.kind != "local" and not ctx.is_rank_zero:
        return {}  # an HTTP teacher is called from rank 0 alone (its own concurrency limits apply)
    personas_path, corpus_path = Path(cfg.personas.file), Path(cfg.data.situations)
    personas = load_personas(personas_path)
    corpus = load_situations(corpus_path, personas, cfg.data.on_bad_line)
    splits = split_situations(corpus, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    selected = select_items(_split_items(splits, cfg.datagen.split), cfg.datagen.limit, cfg.datagen.seed)
    if not selected:
        raise DataError(f"datagen: no situations to generate for: split '{cfg.datagen.split}' of {corpus_path} "
                        f"with datagen.limit={cfg.datagen.limit} selects none")
    prompts = PromptSet.load(cfg.datagen.prompt_file, cfg.datagen.prompts)
    curated, no_record = None, []
    if cfg.datagen.teacher.kind == "curated":  # data, not a model: read before hashing, to know what it covers
        curated = build_teacher(cfg.datagen.teacher, cfg.model).bind(personas, {s.id for s in corpus})
        selected, no_record = _covered(selected, curated, split_of(splits), cfg.datagen.teacher.on_missing)
    chash = datagen_hash(cfg, personas_path, corpus_path, prompts, curated)
    items_dir = ctx.stage_dir / "items"
    data = SituationsDataModule(selected, cfg.datagen.teacher.batch_size)
    data.only = pending_batches(data, items_dir, chash)
    stats = {"tokens": 0, "written": 0, "seconds": 0.0}
    if data.only:
        module = DatagenModule(_cot(cfg, personas, prompts, curated), items_dir, chash, split_of(splits), cfg.datagen.seed)
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
    stats["skipped_no_record"] = len(no_record)
    result = _write_outputs(ctx, records, splits, personas, chash, stats)
    check_quality(result["summary"], cfg.datagen, ctx.stage_dir / "summary.json")
    return result


def check_quality(summary: dict, dcfg, where: Path) -> None:
    """Fail the stage when the teacher did not answer or its replies are not data to train on."""
    if summary["error_rate"] > dcfg.max_error_fraction:
        raise StageFailed(
            f"datagen: {summary['errors']} of {summary['responses']} teacher replies got no answer "
            f"({summary['error_rate']:.0%} > datagen.max_error_fraction={dcfg.max_error_fraction}; first: "
            f"{summary['first_error']}). The {summary['retry_items']} item(s) concerned are not cached as done: "
            "fix the teacher and rerun the same command to generate only them again.")
    if summary["acceptance_rate"] < dcfg.min_accepted_fraction:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected"].items(), key=lambda kv: -kv[1]) if v)
        raise StageFailed(
            f"datagen: only {summary['accepted']} of {summary['responses']} replies passed the quality filters "
            f"({summary['acceptance_rate']:.1%} < datagen.min_accepted_fraction={dcfg.min_accepted_fraction}; "
            f"rejected: {reasons}); see {where}. Lower the minimum to train on this data anyway.")


def _covered(selected: list[Situation], teacher: CuratedTeacher, splits: dict[str, str], on_missing: str):
    """(situations the curated teacher has records for, ids it has none for); a missing one fails unless skipped."""
    refuse_held_out(splits, [s.id for s in selected])
    missing = [s.id for s in selected if s.id not in teacher.replies]
    if missing and on_missing != "skip":
        raise ConfigError(
            f"key 'datagen.teacher.replies': {teacher.name} has no record for situation '{missing[0]}'"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            "set datagen.teacher.on_missing=skip to skip and count them"
        )
    return [s for s in selected if s.id in teacher.replies], missing


def _split_items(splits: dict[str, list[Situation]], name: str) -> list[Situation]:
    if name == "all":
        return [s for group in splits.values() for s in group]
    if name not in splits:
        raise ConfigError(f"key 'datagen.split': '{name}' is not one of train, val, test, all")
    return splits[name]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datagen_hash(cfg: ExperimentConfig, personas_path: Path, corpus_path: Path, prompts: PromptSet, curated=None) -> str:
    """What the generated records depend on: datagen settings, prompt texts, teacher model, inputs' bytes."""
    datagen = to_container(cfg.datagen)
    for key in DATAGEN_NOT_CONTENT:
        section, _, leaf = key.rpartition(".")
        (datagen[section] if section else datagen).pop(leaf)
    datagen["prompts"] = prompts.templates
    datagen.pop("prompt_file")
    payload = {
        "schema_version": SCHEMA_VERSION, "datagen": datagen,
        "data": {k: getattr(cfg.data, k) for k in ("val_fraction", "test_fraction", "split_seed", "on_bad_line")},
        "personas": _file_digest(personas_path), "corpus": _file_digest(corpus_path),
        "teacher": curated.id if curated else teacher_id(cfg.datagen.teacher, cfg.model),
    }
    if cfg.datagen.teacher.kind == "local":
        payload["model"] = {"dtype": cfg.model.dtype, "revision": cfg.model.revision if not cfg.datagen.teacher.model else None}
    return config_hash(payload)


def _cot(cfg: ExperimentConfig, personas: PersonaSet, prompts: PromptSet, curated: Optional[CuratedTeacher] = None):
    if curated is not None:
        return CuratedPersonaCoT(curated, personas, cfg.datagen)
    return PersonaCoT(build_teacher(cfg.datagen.teacher, cfg.model), personas, prompts, cfg.datagen)


def _trainer(cfg: ExperimentConfig) -> L.Trainer:
    """Local teacher: the configured devices split the batches. HTTP teacher: one CPU process is enough."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_modules.common import predict_trainer

    local = cfg.datagen.teacher.kind == "local"
    return predict_trainer(cfg.trainer, spread=local, cpu=not local, callbacks=[TQDMProgressBar(refresh_rate=1)],
                           default_root_dir=str(cfg.output_dir))


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
            reason = error_reason(r["teacher_label_error"])
            rejected[reason] = rejected.get(reason, 0) + 1
    accepted = sum(e["accepted"] for e in entries + fused)
    errors = [e.get("error") for e in entries + fused if "generation_error" in e["flags"]]
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
        "errors": len(errors),
        "error_rate": len(errors) / max(1, len(entries) + len(fused)),
        "first_error": next((e for e in errors if e), None),
        "retry_items": sum(not is_done(r) for r in records),
        "tokens_generated": sum(r["tokens_generated"] for r in records),
        "skipped_no_record": stats.get("skipped_no_record", 0),
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
    metrics = {f"datagen/{k}": summary[k] for k in ("items", "acceptance_rate", "error_rate", "pole_acceptance_rate",
               "fused_acceptance_rate", "analysis_parse_rate", "tokens_generated")}
    metrics.update({f"datagen/rejected/{k}": v for k, v in summary["rejected"].items()})
    metrics.update({"datagen/sft_rows": summary["rows"]["sft"], "datagen/joint_rows": summary["rows"]["joint"],
                    "datagen/skipped_no_record": summary["skipped_no_record"]})
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
                    "dataset hash (sha256 of persona_data.jsonl)": summary["dataset_hash"],
                    **_curated_provenance(cfg, summary)},
        notes={"Quality filters": _CARD_FILTERS, "Intended use and limits": _CARD_LIMITS},
    )


def _curated_provenance(cfg: ExperimentConfig, summary: dict) -> dict:
    if cfg.datagen.teacher.kind != "curated":
        return {}
    return {"curated corpus": f"{cfg.datagen.teacher.replies}, replayed (nothing generated); how it was written and "
                              "checked: datamodules/data/persona_replies_card.md",
            "situations without a record (skipped)": str(summary["skipped_no_record"])}


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
