"""Stage `evaluate`: every system on every benchmark, one MLflow run per system, side by side.

Work is a list of (systems, benchmark) jobs run through Lightning's predict loop, so under DDP the
ranks split the jobs; rank 0 gathers them from the job cache in order. With `evaluate.batch_systems`
a job holds every system, which share one model and its calls (SystemFactory, SystemBatch);
otherwise one system. Each system's result is cached in the stage folder, so a killed evaluation
resumes per system and benchmark. The stage then logs a comparison table, a bar chart per
benchmark metric and a Big Five profile chart.

    personafuse run experiments/smoke.yaml stages=[adapter_sft,sft_baseline,router,evaluate]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.io import ConfigError, DataError, atomic_write_text, did_you_mean, read_json, write_jsonl
from datamodules.personas import BIG_FIVE, load_personas
from lightning_modules.common import load_experts
from lightning_modules.evaluate_systems import SYSTEMS, SystemSpec, system_params
from lightning_modules.components.personafuse import ChatModel
from lightning_modules.evaluate_report import add_intervals, baseline_rows, log_comparison, summary_table, system_note

HEADLINE_METRICS = (
    "eq_bench/score", "eq_bench/parsed", "emobench_eu/accuracy", "emobench_ea/accuracy",
    *(f"mpi/{trait}" for trait in BIG_FIVE),
    "gsm8k/accuracy", "mmlu/accuracy", "xstest/safe_refusal_rate", "xstest/unsafe_compliance_rate",
    "persona_expression/alignment", "persona_expression/own_pole_rate", "persona_expression/pole_preference",
)


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses
class EvalJob:
    systems: list[str]
    """Systems evaluated together (one model call holds rows of each), or a single system."""
    benchmark: str


class GatesUsed:
    """The EvalModel one job hands its benchmark: the system's ChatModel, keeping the gate rows
    that each of its calls returns (they go to records/<system>/gates.json)."""

    def __init__(self, model: ChatModel) -> None:
        self.model, self.rows = model, []

    def generate(self, conversations, max_new_tokens: int) -> list[str]:
        texts, gates = self.model.generate_gated(conversations, max_new_tokens)
        self.rows += gates
        return texts

    def option_logprobs(self, conversations, options) -> list[list[float]]:
        scores, gates = self.model.option_logprobs_gated(conversations, options)
        self.rows += gates
        return scores


class EvaluateModule(L.LightningModule):
    """predict_step runs one job: a benchmark for one system or several together; each system's
    result is cached on its own, so a resumed job runs only the systems not yet done."""

    def __init__(self, build_system: Callable[[str], ChatModel], benchmarks: dict, cache_dir: Path, batch_size: int = 8):
        super().__init__()
        self.build_system, self.benchmarks = build_system, benchmarks
        self.cache_dir, self.batch_size = Path(cache_dir), batch_size

    def predict_step(self, job: Optional[EvalJob], batch_idx: int = 0) -> Optional[list[dict]]:
        if job is None:  # padding: more ranks than jobs
            return None
        todo = [s for s in job.systems if read_json(self._path(s, job.benchmark)) is None]
        benchmark = self.benchmarks[job.benchmark]
        if len(todo) > 1:
            from lightning_modules.components.system_batch import SystemBatch

            batch = SystemBatch({s: self.build_system(s) for s in todo}, self.batch_size)
            for system, (metrics, records, gates) in batch.evaluate(benchmark).items():
                self._store(system, job.benchmark, metrics, records, gates)
        elif todo:
            model = GatesUsed(self.build_system(todo[0]))
            metrics, records = benchmark.evaluate(model, self.batch_size)
            self._store(todo[0], job.benchmark, metrics, records, model.rows)
        return [read_json(self._path(s, job.benchmark)) for s in job.systems]

    def _path(self, system: str, benchmark: str) -> Path:
        return self.cache_dir / system / f"{benchmark}.json"

    def _store(self, system: str, benchmark: str, metrics: dict, records: list, gates: list) -> None:
        result = {"system": system, "benchmark": benchmark, "metrics": metrics, "records": records, "gates": gates}
        atomic_write_text(self._path(system, benchmark), json.dumps(result))


def build_benchmarks(ecfg, cfg=None) -> dict:
    """Benchmark id -> configured instance; ids are built-ins or YAML benchmarks. `cfg` (the whole
    experiment config) is needed by persona_expression, which reads the corpus it was built from."""
    from datamodules.benchmarks import BENCHMARKS, load_yaml_benchmarks

    yaml_benchmarks = {}
    if ecfg.benchmark_files:
        yaml_benchmarks = load_yaml_benchmarks(ecfg.benchmark_files, data_root=ecfg.data_root)
    out = {}
    for name, bcfg in ecfg.benchmarks.items():
        if name in BENCHMARKS:
            out[name] = _builtin(BENCHMARKS.get(name), name, bcfg, ecfg.data_root)
        elif name in yaml_benchmarks:
            bench = yaml_benchmarks[name]
            bench.limit, bench.seed = bcfg.limit, bcfg.seed
            out[name] = bench
        else:
            known = sorted(set(BENCHMARKS) | set(yaml_benchmarks))
            raise ConfigError(f"key 'evaluate.benchmarks.{name}': unknown benchmark '{name}'{did_you_mean(name, known)} "
                              f"(known: {', '.join(known)})")
    if "persona_expression" in out:
        from lightning_modules.evaluate_persona import bind_persona_expression

        if cfg is None:
            raise ValueError("persona_expression needs the experiment config: build_benchmarks(ecfg, cfg)")
        bind_persona_expression(out["persona_expression"], cfg)
    return out


def _builtin(cls, name: str, bcfg, data_root):
    """A built-in benchmark; an option its constructor does not take is a config error naming it."""
    import inspect

    accepted = [p for p in inspect.signature(cls).parameters if p not in ("data_root", "limit", "seed")]
    for option in bcfg.options:
        if option not in accepted:
            raise ConfigError(f"key 'evaluate.benchmarks.{name}.options.{option}': {name} has no option '{option}'"
                              f"{did_you_mean(option, accepted)} (options: {', '.join(accepted) or 'none'})")
    return cls(data_root, bcfg.limit, bcfg.seed, **bcfg.options)


def plan_jobs(ecfg, benchmarks: dict) -> list[EvalJob]:
    """(systems, benchmark) jobs: every system together per benchmark (batch_systems) or one by one,
    each benchmark limited to its `systems` when it names some."""
    groups = [list(ecfg.systems)] if ecfg.batch_systems else [[s] for s in ecfg.systems]
    jobs = []
    for name in benchmarks:
        only = ecfg.benchmarks[name].systems if name in ecfg.benchmarks else None
        jobs += [EvalJob(kept, name) for g in groups if (kept := [s for s in g if only is None or s in only])]
    return jobs


def check_benchmark_systems(ecfg) -> None:
    """A benchmark's `systems` must be evaluated systems, and include the baseline when it is evaluated
    (vs_baseline.md compares item by item)."""
    for name, bench in ecfg.benchmarks.items():
        if bench.systems is None:
            continue
        unknown = [s for s in bench.systems if s not in ecfg.systems]
        if unknown or not bench.systems:
            raise ConfigError(f"key 'evaluate.benchmarks.{name}.systems': {unknown or 'empty'} "
                              f"{'are not in evaluate.systems' if unknown else 'evaluates nothing'} "
                              f"({', '.join(ecfg.systems)})")
        if ecfg.baseline in ecfg.systems and ecfg.baseline not in bench.systems:
            raise ConfigError(f"key 'evaluate.benchmarks.{name}.systems': include the baseline '{ecfg.baseline}' "
                              "(every system is compared with it item by item)")


def check_evaluation(cfg, stages: list[str]) -> None:
    """Before any stage runs: every benchmark is known, takes its options and has its data; every
    system's stages come earlier in `stages`."""
    check_systems(cfg.evaluate.systems, stages[: stages.index("evaluate")] if "evaluate" in stages else stages)
    check_benchmark_systems(cfg.evaluate)
    for name, bench in build_benchmarks(cfg.evaluate, cfg).items():
        try:
            bench.load_items()
        except DataError as err:
            raise ConfigError(f"key 'evaluate.benchmarks.{name}': {err}") from None


def check_systems(systems: list[str], stages) -> None:
    """Fail before any work if a system needs a stage the pipeline does not run before evaluate."""
    for name in systems:
        spec: SystemSpec = SYSTEMS.get(name)
        needs = [spec.adapters] if spec.adapters else []
        needs += ["router"] if spec.needs_router or spec.gates in ("uniform", "oracle") else []
        missing = [s for s in dict.fromkeys(needs) if s not in stages]
        if missing:
            raise ConfigError(f"key 'evaluate.systems': system '{name}' needs stage(s) {missing} earlier in `stages`")


class SystemFactory:
    """Builds each system's ChatModel from the upstream stages' outputs, all over one shared model.

    Every built-in system is that model with a gate function and perhaps the persona prompt: the
    ten experts (when adapter_sft or joint ran), plus the SFT baseline's LoRA stacked as one more
    expert when `sft` is evaluated, so one load serves all and systems can share model calls.
    Without any experts the shared model is the plain base model.
    """

    def __init__(self, ctx, systems: list[str]):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.stack_sft = any(SYSTEMS.get(s).adapters == "sft_baseline" for s in systems)
        self._shared = None
        self._fuse = None

    def __call__(self, name: str) -> ChatModel:
        spec: SystemSpec = SYSTEMS.get(name)
        prompt = self.cfg.evaluate.persona_prompt if spec.persona_prompt else None
        model, tok = self._model()
        return ChatModel(model, tok, self._gate_fn(spec, model), prompt, self.cfg.evaluate.batch_size)

    def _model(self):
        """The shared model, loaded once."""
        if self._shared is None:
            experts = "adapter_sft" in self.ctx.outputs or "joint" in self.ctx.outputs
            names = load_personas(self.cfg.personas.file).ids if experts else []
            adapters = self._tuned("adapter_sft")["adapters"] if experts else ""
            extra = {"sft": str(Path(self.ctx.outputs["sft_baseline"]["adapters"]) / "sft")} if self.stack_sft else {}
            if names or extra:
                self._shared = load_experts(self.cfg.model, self.cfg.lora, adapters, names, extra)
            else:
                from lightning_modules.components.base_model import load_configured, pick_device

                model, tok = load_configured(self.cfg.model)
                self._shared = (model.to(pick_device(self.cfg.model.device)), tok)
        return self._shared

    def _tuned(self, stage: str) -> dict:
        """The joint stage's experts and router supersede the separately trained ones when it ran."""
        return self.ctx.outputs.get("joint") or self.ctx.outputs[stage]

    def _personafuse(self):
        if self._fuse is None:
            from lightning_modules.components.personafuse import PersonaFuse
            from lightning_modules.components.router import load_router

            model, tok = self._model()
            router, meta = load_router(Path(self._tuned("router")["router"]))
            self._fuse = _RouteOnce(PersonaFuse(model, tok, router.to(next(model.parameters()).device), meta))
        return self._fuse

    def _gate_fn(self, spec: SystemSpec, model):
        """[n, E] gates over the shared model's experts for a batch of conversations (None: no experts)."""
        if spec.gates is None:
            return None
        if spec.gates in ("pole", "single"):
            index = model.expert_names.index("sft" if spec.gates == "single" else spec.pole)
            return lambda convs: torch.nn.functional.one_hot(torch.full((len(convs),), index), model.num_experts).float()
        from lightning_modules.evaluate_gates import gate_function

        fuse = self._personafuse()
        routed = gate_function(spec, fuse, self.cfg)
        extra = model.num_experts - fuse.fuse.router.num_experts
        if not extra:
            return routed
        return lambda convs: torch.nn.functional.pad(routed(convs), (0, extra))  # stacked extra experts: off


class _RouteOnce:
    """PersonaFuse whose `route` remembers the last batch: every routed system of one evaluation
    round routes the same conversations, and routing is deterministic, so it runs once."""

    def __init__(self, fuse) -> None:
        self.fuse, self.meta, self.router = fuse, fuse.meta, fuse.router
        self._last: Optional[tuple] = None

    def route(self, conversations) -> torch.Tensor:
        key = json.dumps(list(conversations), sort_keys=True)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.fuse.route(conversations))
        return self._last[1]


def run(ctx) -> dict:
    ecfg = ctx.cfg.evaluate
    check_systems(ecfg.systems, list(ctx.outputs))
    factory = SystemFactory(ctx, ecfg.systems)
    benchmarks = build_benchmarks(ecfg, ctx.cfg)
    jobs = plan_jobs(ecfg, benchmarks)
    module = EvaluateModule(factory, benchmarks, ctx.stage_dir / "jobs", ecfg.batch_size)
    trainer, sharded = _trainer(ctx.cfg.trainer)
    if not sharded and not ctx.is_rank_zero:
        return {}  # rank 0 evaluates alone
    padding = [None] * max(0, trainer.world_size - len(jobs))  # Lightning's sampler needs a job per rank
    loader = DataLoader(jobs + padding, batch_size=None, shuffle=False, collate_fn=lambda job: job)
    trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier()  # every rank's jobs are cached before rank 0 gathers them
    if not ctx.is_rank_zero:
        return {}
    # each read back from its cache files, in job order
    results = [result for job in jobs for result in module.predict_step(job)]
    by_system = _group(results)
    downstream = {}
    if ecfg.judge.enabled:
        from lightning_modules.evaluate_judge import judge_downstream

        downstream = judge_downstream(ctx, factory, ecfg.systems)
    for system, metrics in downstream.items():
        by_system.setdefault(system, {"metrics": {}, "records": {}, "gates": []})["metrics"].update(metrics)
    add_intervals(by_system, benchmarks, ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    if "persona_expression" in benchmarks:
        from lightning_modules.evaluate_persona import add_persona_expression_metrics

        add_persona_expression_metrics(by_system, benchmarks["persona_expression"], ecfg.baseline,
                                       ecfg.bootstrap_samples, ecfg.bootstrap_seed)
    vs_baseline = baseline_rows(by_system, benchmarks, ecfg.baseline, ecfg.bootstrap_samples, ecfg.bootstrap_seed, HEADLINE_METRICS)
    run_ids = _log_systems(ctx, by_system)
    metrics = {s: v["metrics"] for s, v in by_system.items()}
    table = log_comparison(ctx, metrics, HEADLINE_METRICS, vs_baseline)
    summary = summary_table(metrics, HEADLINE_METRICS)
    ctx.set_note(summary)
    return {"systems": run_ids, "table": str(table), "summary": summary}


def _trainer(t) -> tuple[L.Trainer, bool]:
    """(predict Trainer, whether the ranks share the jobs). Under DDP every rank takes whole jobs;
    under any other strategy rank 0 runs alone."""
    from lightning_modules.common import predict_trainer

    sharded = t.strategy in ("ddp", "ddp_cpu")  # devices may be "auto": Lightning decides how many ranks
    return predict_trainer(t, spread=sharded, inference_mode=True), sharded


def _group(results: list[dict]) -> dict[str, dict]:
    grouped: dict[str, dict] = {}
    for r in results:
        entry = grouped.setdefault(r["system"], {"metrics": {}, "records": {}, "gates": []})
        entry["metrics"].update(r["metrics"])
        entry["records"][r["benchmark"]] = r["records"]
        entry["gates"] += r["gates"]
    return grouped


def _log_systems(ctx, by_system: dict) -> dict[str, str]:
    """One MLflow child run per system (same metric keys, tag system=<name>); reused on resume."""
    state_file = ctx.stage_dir / "system_runs.json"
    run_ids: dict[str, str] = read_json(state_file) or {}
    for system, entry in by_system.items():
        tags = {"stage": "evaluate", "system": system, "base_model": ctx.cfg.model.name_or_path}
        run_id = ctx.child_run(f"evaluate:{system}", tags, run_ids.get(system))
        if run_id != run_ids.get(system):
            run_ids[system] = run_id
            atomic_write_text(state_file, json.dumps(run_ids))
        _log_one_system(ctx, run_ids[system], system, entry)
    return run_ids


def _log_one_system(ctx, run_id: str, system: str, entry: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(ctx.tracking_uri)
    sub = type(ctx)(**{**ctx.__dict__, "run_id": run_id})
    spec = SYSTEMS.get(system)
    sub.log_params(system_params(system, spec))
    sub.log_metrics(entry["metrics"])
    sub.set_note(system_note(system, spec.description, entry["metrics"], HEADLINE_METRICS))
    folder = ctx.stage_dir / "records" / system
    for bench, records in entry["records"].items():
        write_jsonl(folder / f"{bench}.jsonl", records)
    if entry["gates"]:
        atomic_write_text(folder / "gates.json", json.dumps(entry["gates"]))
    if folder.exists():
        client.log_artifacts(run_id, str(folder), "records")
    client.set_terminated(run_id, "FINISHED")
