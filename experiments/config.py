"""Typed experiment configuration: dataclass schema <- YAML files <- `key=value` overrides.

Every field has a default and a one-line docstring (shown by `personafuse config [SECTION]`).
Defaults marked "(ours)" are this project's choices, not values reported by the paper.
Stages receive the typed section they need, never the whole config.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from datamodules.io import ConfigError, config_hash, did_you_mean, project_path, project_root, to_container  # noqa: F401 (re-exported)
from datamodules.redaction import redact, remember_secret
from experiments.validation import check_ranges

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """Hugging Face id, local folder, or a built-in name: smollm2-135m-instruct, tiny-random-llama."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """Device for inference outside a Trainer: auto (cuda if present), cpu, cuda, cuda:N."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repository."""
    revision: Optional[str] = None
    """Pinned hub revision (commit) for reproducibility."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank of every persona expert (ours)."""
    alpha: float = 32.0
    """LoRA alpha; the delta is scaled by alpha / r (ours)."""
    dropout: float = 0.05
    """Dropout on the expert input during training (ours)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Leaf names of the linear layers that get experts (attention and MLP projections)."""


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: Any = "auto"
    """Devices per node (int, list or 'auto')."""
    num_nodes: int = 1
    """Nodes for multi-node runs (SLURM)."""
    strategy: str = "auto"
    """Registered strategy id: auto, ddp, ddp_cpu, fsdp, fsdp_cpu, deepspeed_zero2, deepspeed_zero3 (Lightning's
    deepspeed_stage_2[_offload] / deepspeed_stage_3[_offload] are accepted too)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON/YAML of your own for the deepspeed strategies, instead of the shipped file for the
    ZeRO stage; its stage must match the strategy, and bf16/fp16 in it must agree with `precision`."""
    deepspeed_offload: bool = False
    """DeepSpeed ZeRO-Offload: optimizer states (ZeRO-3: also parameters) in CPU RAM. Slower; more room."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, bf16-true, 16-mixed."""
    max_steps: int = 20
    """Optimizer steps per training stage unless the stage sets its own."""
    val_check_interval: Optional[int] = None
    """Validate every N steps (None: once per epoch / at the end)."""
    log_every_n_steps: int = 1
    """How often to log training metrics."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    gradient_clip_val: Optional[float] = 1.0
    """Gradient norm clip (None: off)."""
    checkpoint_every_n_steps: int = 5
    """Save a resumable checkpoint (trainable weights + optimizer) every N steps."""


@dataclass
class PersonasConfig:
    file: str = "experiments/personas/big_five.yaml"
    """Persona set YAML (one entry per pole); relative paths are from the project root."""


@dataclass
class DataConfig:
    situations: str = "datamodules/data/situations.jsonl"
    """Situations corpus (JSONL with activation labels)."""
    val_fraction: float = 0.1
    """Fraction of each domain held out for validation."""
    test_fraction: float = 0.2
    """Fraction of each domain held out for testing."""
    split_seed: int = 0
    """Seed of the stratified split; the split depends on nothing else."""
    on_bad_line: str = "fail"
    """A malformed JSONL line: fail (report file:line) or skip (count and warn)."""


@dataclass
class TeacherConfig:
    kind: str = "local"
    """Registered teacher id: local (a transformers model), openai (any OpenAI-compatible endpoint) or curated (replays the curated corpus; datagen only)."""
    model: Optional[str] = None
    """Local: model name_or_path (None: the experiment's base model). OpenAI: the served model name."""
    base_url: Optional[str] = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in config)."""
    max_concurrency: int = 8
    """Concurrent HTTP requests."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_retries: int = 4
    """Retries on 429/5xx/timeouts, with exponential backoff."""
    backoff_s: float = 1.0
    """First backoff delay; doubles each retry."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    max_new_tokens: int = 96
    """Token budget per generated answer."""
    batch_size: int = 8
    """Local teacher: prompts per generate call; datagen: also situations per predict batch (its seed and resume unit)."""
    replies: str = "datamodules/data/persona_replies.jsonl"
    """Curated teacher: the recorded Persona-CoT corpus it replays (relative paths are from the project root)."""
    on_missing: str = "fail"
    """Curated teacher: a situation with no record fails, naming it (fail), or is skipped and counted (skip)."""


@dataclass
class DatagenConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Which model writes the persona data."""
    split: str = "train"
    """Which corpus split(s) to generate for: train, val, test or all."""
    limit: Optional[int] = None
    """Situations to process (None: all of the split), chosen deterministically."""
    parse_retries: int = 1
    """Extra attempts when the teacher's output cannot be parsed."""
    prompts: dict[str, str] = field(default_factory=dict)
    """Prompt templates by key (analysis_system, analysis_user, pole_system, fused_system, judge_system, judge_user) overriding prompt_file."""
    prompt_file: str = "experiments/prompts/persona_cot.yaml"
    """Persona-CoT template file (relative paths are from the project root)."""
    activation_threshold: float = 0.5
    """A pole whose curated label reaches this is asked for in the fused response (at least the top pole is) (ours)."""
    retry_temperature: float = 0.7
    """Sampling temperature of parse retries when the teacher is greedy (a greedy retry repeats itself) (ours)."""
    analysis_max_new_tokens: Optional[int] = None
    """Token budget of the cues + ratings answer (None: 10 per pole + 64, enough for the rating lines)."""
    min_words: int = 3
    """Quality filter: shortest acceptable response."""
    max_words: int = 220
    """Quality filter: longest acceptable response."""
    duplicate_threshold: float = 0.9
    """Quality filter: token-set similarity above which two pole responses are near-duplicates."""
    judge: bool = False
    """Ask the teacher to confirm that each pole response expresses its pole."""
    seed: int = 0
    """Sampling seed."""
    min_accepted_fraction: float = 0.05
    """The stage fails when fewer of its replies pass the filters: a broken teacher or prompt, not data to train on (ours)."""
    max_error_fraction: float = 0.1
    """The stage fails when more replies got no answer from the teacher (down, timing out); the rerun retries only those items (ours)."""


@dataclass
class AdapterSFTConfig:
    data: str = "auto"
    """Training records: auto (datagen output when the pipeline has it, else persona examples), persona_examples, or a JSONL path of {messages, response, pole}."""
    include_persona_examples: bool = True
    """Also train on the persona YAML's example replies."""
    lr: float = 2e-4
    """AdamW learning rate (ours)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per batch (poles may mix)."""
    max_length: int = 256
    """Token limit per example (prompt + response)."""
    max_steps: Optional[int] = None
    """Optimizer steps (None: trainer.max_steps)."""
    val_fraction: float = 0.15
    """Held-out fraction of the SFT records, per pole."""
    export: str = "last"
    """Experts to export: last (the final step) or best (the validated step with the lowest val/loss over all poles, kept as checkpoints/best-step=N.ckpt)."""


@dataclass
class RouterLossConfig:
    bce: float = 1.0
    """Weight of binary cross-entropy against the activation labels."""
    contrastive: float = 0.0
    """Weight of the context/expert-embedding contrastive loss."""
    load_balance: float = 0.0
    """Weight of the load-balance regulariser."""
    pole_exclusivity: float = 0.0
    """Weight of the regulariser against activating both poles of one trait."""


@dataclass
class RouterConfig:
    encoder: str = "base_hidden"
    """Registered encoder id: base_hidden (the frozen base model's states) or minilm or hf:<id or path>."""
    layer: int = -1
    """Hidden-state layer to mean-pool for base_hidden (negative counts from the top)."""
    hidden: int = 256
    """Width of the router MLP (ours)."""
    gate: str = "topk"
    """Registered gate normalisation: topk (softmax over the top_k poles, the rest 0; gates sum to 1),
    softmax or sigmoid (independent per pole: on the curated labels the gates sum to about 3.3, which
    drives the mixed experts at several times the strength each was trained at; see README)."""
    temperature: float = 1.0
    """Softmax / top-k temperature."""
    top_k: int = 3
    """Experts kept by topk gates."""
    loss: RouterLossConfig = field(default_factory=RouterLossConfig)
    """Loss weights."""
    lr: float = 1e-3
    """AdamW learning rate."""
    batch_size: int = 32
    """Situations per batch."""
    max_epochs: int = 30
    """Epochs over the cached context embeddings."""
    dropout: float = 0.1
    """Dropout in the router MLP."""


@dataclass
class JointConfig:
    data: str = "auto"
    """Fused responses {messages, response, label}: auto (datagen's joint.jsonl) or a JSONL path."""
    lr: float = 2e-5
    """Low learning rate for joint tuning of router and experts."""
    router_loss_weight: float = 0.5
    """Weight of the router loss added to the LM loss on fused responses."""
    batch_size: int = 4
    """Examples per batch."""
    max_length: int = 256
    """Token limit per example."""
    max_steps: Optional[int] = None
    """Optimizer steps (None: trainer.max_steps)."""


@dataclass
class BenchmarkConfig:
    limit: Optional[int] = None
    """Items to use (None: all), chosen deterministically from the seed."""
    seed: int = 0
    """Selection and option-shuffle seed."""
    options: dict[str, Any] = field(default_factory=dict)
    """Benchmark-specific options (e.g. k_shot for mmlu, max_new_tokens, language)."""
    systems: Optional[list[str]] = None
    """Evaluate only these of evaluate.systems on this benchmark (None: all), e.g. the capability
    no-drop checks on base, sft and personafuse alone rather than on every ablation."""


@dataclass
class JudgeConfig:
    enabled: bool = True
    """Judge downstream replies (mental-health support, customer service)."""
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(temperature=0.0, max_new_tokens=48))
    """The judge model (local or OpenAI-compatible)."""
    limit: Optional[int] = 8
    """Test situations per domain."""
    reply_max_new_tokens: int = 96
    """Token budget of each system's reply to a downstream situation."""
    domains: list[str] = field(default_factory=lambda: ["mental_health_support", "customer_service"])
    """Corpus domains used as downstream tasks."""


@dataclass
class EvaluateConfig:
    systems: list[str] = field(default_factory=lambda: ["base", "prompting", "sft", "personafuse"])
    """Registered system ids to compare."""
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    """Benchmark id -> settings; ids are built-ins or YAML benchmarks."""
    benchmark_files: list[str] = field(default_factory=list)
    """Extra YAML-defined benchmarks (files or folders)."""
    data_root: Optional[str] = None
    """Benchmark data root (None: $PERSONAFUSE_BENCHMARKS, ../shared/benchmarks, ~/.cache/personafuse/benchmarks)."""
    batch_size: int = 8
    """Prompts per batch (rows per model call, also when several systems share a call)."""
    batch_systems: bool = True
    """Evaluate the systems that share one model (every built-in system) together: each model call
    holds rows of several systems, each with its own gates and prompt (see system_batch.py). Off:
    one system after another, the same records (log-likelihoods equal within float tolerance)."""
    persona_prompt: str = (
        "Before you answer, read the situation: what does the person need, and which Big Five traits "
        "(openness, conscientiousness, extraversion, agreeableness, emotional stability) would a wise, "
        "caring person show here? Adopt those traits in your reply."
    )
    """System prompt of the direct-prompting systems (ours)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Downstream tasks judged by a model."""
    bootstrap_samples: int = 1000
    """Resamples behind every metric's 95% interval and each system's paired difference from `baseline` (0: none)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling (the same seed gives the same intervals)."""
    baseline: str = "base"
    """System every other system is compared with, item by item, in vs_baseline.md (when it is evaluated)."""


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None
    """MLflow store (None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)."""
    experiment: Optional[str] = None
    """MLflow experiment name (None: the experiment's name)."""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Experiment name: the MLflow experiment and the output folder."""
    stages: list[str] = field(default_factory=list)
    """Registered stage ids to run, in order: datagen, adapter_sft, sft_baseline, router, joint, evaluate."""
    output_dir: str = "outputs/${name}"
    """Where this run's files go (resolved config, datasets, adapters, tables)."""
    seed: int = 0
    """Global seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    personas: PersonasConfig = field(default_factory=PersonasConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    datagen: DatagenConfig = field(default_factory=DatagenConfig)
    adapter_sft: AdapterSFTConfig = field(default_factory=AdapterSFTConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    """Names of the experiment YAMLs that ship in experiments/ (`personafuse run NAME` runs one)."""
    return sorted(p.stem for p in (project_root() / "experiments").glob("*.yaml"))


def experiment_path(spec: str | Path) -> Path:
    """A config argument as a file: an existing file or anything path-like as given, else a shipped
    config's name (`quickstart` -> experiments/quickstart.yaml), so both spellings run the same file."""
    path = Path(spec)
    text = str(spec)
    if path.exists() or "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        return path
    named = project_root() / "experiments" / f"{text}.yaml"
    if not named.is_file():
        raise ConfigError(f"no config file or shipped config named '{text}'{did_you_mean(text, shipped_configs())}"
                          f" (shipped: {', '.join(shipped_configs())})")
    return named


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Schema <- YAML <- overrides, as a typed object. Raises ConfigError naming the file and key.
    `path` may also name a shipped config (see experiment_path)."""
    path = experiment_path(path)
    merged = OmegaConf.structured(ExperimentConfig)
    merged = _merge_yaml(merged, path)
    merged = _merge_overrides(merged, list(overrides), str(path))
    _remember_env_values(merged)
    try:
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    _resolve_paths(cfg)  # first: the checks open files, and a run may start outside the project folder
    _check_registered(cfg, str(path))
    check_ranges(cfg, str(path))
    return cfg


_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([^,}]+)")


def _remember_env_values(merged: DictConfig) -> None:
    """Values that `${oc.env:VAR}` brings in are secrets by assumption (that is how a key is passed
    without writing it down): every text written from here on masks them (see datamodules/redaction.py)."""
    raw = json.dumps(OmegaConf.to_container(merged, resolve=False))
    for name in _ENV_INTERPOLATION.findall(raw):
        remember_secret(os.environ.get(name.strip()))


DATA_SOURCE_WORDS = ("auto", "persona_examples")
"""Values of adapter_sft.data / joint.data that name a source rather than a file."""


def _resolve_paths(cfg: ExperimentConfig) -> None:
    """Resolve every file path in the config once, here, so stages use them as given (see project_path).
    A path that exists as given (the usual run from the project root) keeps its spelling, so config
    hashes do not depend on where the project is checked out."""
    cfg.personas.file = str(project_path(cfg.personas.file))
    cfg.data.situations = str(project_path(cfg.data.situations))
    cfg.datagen.prompt_file = str(project_path(cfg.datagen.prompt_file))
    cfg.datagen.teacher.replies = str(project_path(cfg.datagen.teacher.replies))
    cfg.evaluate.benchmark_files = [str(project_path(p)) for p in cfg.evaluate.benchmark_files]
    if cfg.trainer.deepspeed_config:
        cfg.trainer.deepspeed_config = str(project_path(cfg.trainer.deepspeed_config))
    for section in (cfg.adapter_sft, cfg.joint):
        if section.data not in DATA_SOURCE_WORDS:
            section.data = str(project_path(section.data))


def _merge_yaml(base: DictConfig, path: Path) -> DictConfig:
    from datamodules.io import read_yaml_mapping

    data = read_yaml_mapping(path, "config file", ConfigError)
    data.setdefault("name", path.stem)
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None


def _merge_overrides(base: DictConfig, overrides: list[str], config_path: str) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. trainer.max_steps=3)")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"command-line override '{item}' (on {config_path})") from None
        except yaml.YAMLError as err:  # the value is read as YAML: `k={a:{b:1}}` needs a space after ':'
            raise ConfigError(f"command-line override '{item}' (on {config_path}): value is not valid YAML "
                              f"({err.problem}); write mappings as {{a: 1}}") from None
    return base


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line naming the source, the key and a close match."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        return ConfigError(f"{source}: unknown key '{key}'{did_you_mean(str(key), _schema_keys(ExperimentConfig))}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: wrong type for key '{key}': {msg}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def _schema_keys(schema: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in fields(schema):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys.extend(_schema_keys(type(default), dotted + "."))
    return keys


EXPORT_CHOICES = ("last", "best")


def _check_registered(cfg: ExperimentConfig, source: str) -> None:
    """A YAML may only name registered things; say which key names an unknown one."""
    from experiments import registry

    checks = [("stages", cfg.stages, registry.STAGES), ("evaluate.systems", cfg.evaluate.systems, registry.SYSTEMS)]
    checks += [("trainer.strategy", [cfg.trainer.strategy], registry.STRATEGIES)]
    checks += [("datagen.teacher.kind", [cfg.datagen.teacher.kind], registry.TEACHERS)]
    checks += [("evaluate.judge.teacher.kind", [cfg.evaluate.judge.teacher.kind], registry.TEACHERS)]
    checks += [("router.gate", [cfg.router.gate], registry.GATES)]
    for key, names, reg in checks:
        for name in names:
            if name not in reg:
                raise ConfigError(f"{source}: key '{key}': {reg.unknown_message(name)}")
    if cfg.adapter_sft.export not in EXPORT_CHOICES:
        raise ConfigError(f"{source}: key 'adapter_sft.export': must be one of {list(EXPORT_CHOICES)}, "
                          f"got {cfg.adapter_sft.export!r}")
    _check_curated_teacher(cfg, source)
    if not cfg.router.encoder.startswith("hf:") and cfg.router.encoder not in registry.ENCODERS:
        raise ConfigError(f"{source}: key 'router.encoder': {registry.ENCODERS.unknown_message(cfg.router.encoder)}")


def _check_curated_teacher(cfg: ExperimentConfig, source: str) -> None:
    """The curated teacher only replays datagen records: it cannot judge, and test replies stay held out."""
    if cfg.evaluate.judge.teacher.kind == "curated":
        raise ConfigError(f"{source}: key 'evaluate.judge.teacher.kind': the curated teacher replays recorded "
                          "replies and cannot judge; use local or openai")
    teacher = cfg.datagen.teacher
    if teacher.kind != "curated":
        return
    if teacher.on_missing not in ("fail", "skip"):
        raise ConfigError(f"{source}: key 'datagen.teacher.on_missing': must be 'fail' or 'skip', got {teacher.on_missing!r}")
    if cfg.datagen.split in ("test", "all"):
        raise ConfigError(f"{source}: key 'datagen.split': '{cfg.datagen.split}' would train on the curated replies "
                          "of held-out test situations; use train or val with datagen.teacher.kind=curated")
    if cfg.datagen.judge:
        raise ConfigError(f"{source}: key 'datagen.judge': the curated teacher cannot judge its own replies; set it false")
    if "datagen" in cfg.stages and not Path(teacher.replies).is_file():
        raise ConfigError(f"{source}: key 'datagen.teacher.replies': file not found: {teacher.replies}")


# --------------------------------------------------------------------------- saving


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, credentials masked: what is printed and saved with a run."""
    return redact(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def help_text(section: str = "") -> str:
    """Every config key under `section` (all when empty) with the default in force and its docstring.
    Defaults are read from a built config, not the classes: a section's default_factory may set
    other values than its class does (evaluate.judge.teacher is greedy, datagen.teacher samples)."""
    parent, node = _section(section)
    if not is_dataclass(node):  # a single key
        return _key_line(section, node, _field_docs(type(parent)).get(section.rpartition(".")[2], ""))
    lines: list[str] = []
    _describe(node, f"{section}." if section else "", lines)
    return "\n".join(lines)


def _section(section: str) -> tuple[Any, Any]:
    """(the enclosing section, the section or value) a dotted name points to in a default config."""
    parent = node = ExperimentConfig()
    for part in section.split(".") if section else []:
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            raise ConfigError(f"unknown config section '{section}'{did_you_mean(section, config_sections())} "
                               "(`personafuse config` lists every key)")
        parent, node = node, getattr(node, part)
    return parent, node


def config_sections() -> list[str]:
    """Every dotted config key and section, for `personafuse config SECTION` suggestions."""
    return _schema_keys(ExperimentConfig)


def _describe(node: Any, prefix: str, lines: list[str]) -> None:
    docs = _field_docs(type(node))
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _describe(value, f"{prefix}{f.name}.", lines)
        else:
            lines.append(_key_line(f"{prefix}{f.name}", value, docs.get(f.name, "")))


def _key_line(key: str, value: Any, doc: str) -> str:
    return f"  {key} = {value!r}\n      {doc}"


def _field_docs(schema: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs
