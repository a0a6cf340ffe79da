"""The registries that components dispatch through: teacher kinds, gate normalisations, router encoders.

Each entry maps an id (the value a YAML names) to the function that builds the thing. Entries are
`module:attribute` strings resolved on first use, so this module stays free of torch and
experiments/registry.py can list and validate ids cheaply. Adding one is one line here plus its
builder function.
"""
from __future__ import annotations

from datamodules.io import Registry

DATAGEN_NOT_CONTENT = ("teacher.max_concurrency", "teacher.timeout_s", "teacher.max_retries", "teacher.backoff_s",
                       "min_accepted_fraction", "max_error_fraction")
"""Settings of the datagen section that cannot change what is generated (transport, pass/fail
thresholds): the item cache and the stage hash leave them out, so changing one redoes nothing."""

TEACHERS = Registry("teacher")
GATES = Registry("gate normalisation")
ENCODERS = Registry("router encoder")

# build(cfg: TeacherConfig, default_model: ModelConfig, section: str) -> Teacher; the teacher's .id must
# equal components.teachers.teacher_id(cfg, default_model), which is known before anything is loaded.
TEACHERS.add("local", "lightning_modules.components.teachers:build_local_teacher",
             "a transformers model through Lightning's predict loop")
TEACHERS.add("openai", "lightning_modules.components.teachers:build_openai_teacher",
             "any OpenAI-compatible chat-completions endpoint")
TEACHERS.add("curated", "lightning_modules.components.curated_teacher:build_curated_teacher",
             "replays the curated Persona-CoT corpus (datagen only; generates nothing)")

# gates(logits, temperature, top_k) -> gates in [0, 1]
GATES.add("sigmoid", "lightning_modules.components.router:sigmoid_gates", "independent sigmoid per pole")
GATES.add("softmax", "lightning_modules.components.router:softmax_gates", "softmax over poles with temperature")
GATES.add("topk", "lightning_modules.components.router:topk_gates", "softmax over the top-k poles, others zero")

# build(layer, base_model, tokenizer) -> encoder module; an 'hf:<id or path>' encoder needs no entry.
ENCODERS.add("base_hidden", "lightning_modules.components.router:base_hidden_encoder",
             "mean-pooled hidden states of the frozen base model")
ENCODERS.add("minilm", "lightning_modules.components.router:minilm_encoder", "the bundled all-MiniLM-L6-v2 sentence encoder")
