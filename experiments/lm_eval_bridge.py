"""lm-evaluation-harness bridge: any evaluated system of a finished run as an lm-eval model.

    personafuse lm-eval outputs/quickstart --system personafuse --tasks mmlu_abstract_algebra --limit 20 \\
        --output lm_eval/personafuse.json
    python -m experiments.lm_eval_bridge --model personafuse --apply_chat_template \\
        --model_args run=outputs/quickstart,system=personafuse --tasks hellaswag --limit 50   # lm-eval's own CLI

Needs the `lmeval` extra (`pip install -e .[lmeval]`); nothing else in the project imports this file.
Importing it registers the model `personafuse` with lm-eval, which has no plugin entry point for
models, hence `python -m experiments.lm_eval_bridge` in place of `lm_eval`.

The system is built exactly as the evaluate stage builds it (SystemFactory over the run's config and
stage outputs), so routing, the persona prompt and scoring are the project's own: the router picks
gates per request from that request's conversation. Systems are chat systems, so lm-eval must render
each context with the chat template (`apply_chat_template`, which `personafuse lm-eval` always sets):
the bridge gets the conversation back from the text it rendered, and scores an option as the
evaluate stage does, tokenised on its own after the templated prompt.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the extra is optional: say how to get it
    raise ImportError("the lm-eval bridge needs lm-evaluation-harness: pip install -e '.[lmeval]'") from err

from datamodules.io import ConfigError, atomic_write_text, read_json

MODEL_NAME = "personafuse"
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's own default for generate_until when a task names none."""
_SAMPLING_ONLY = ("top_p", "top_k")
"""Generation settings that greedy decoding ignores, so a task may carry them."""


def load_system(run_dir: str | Path, system: str, device: Optional[str] = None):
    """The ChatModel of `system` over a finished run folder, built as the evaluate stage builds it."""
    from experiments.config import load_config
    from lightning_modules.evaluate import SystemFactory, check_systems
    from lightning_modules.evaluate_systems import SYSTEMS

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: not a pipeline output folder (no {config_file.name}; `personafuse run` writes it)")
    if system not in SYSTEMS:
        raise ConfigError(f"model_args 'system': {SYSTEMS.unknown_message(system)}")
    cfg = load_config(config_file, [f"model.device={device}"] if device else [])
    outputs = finished_outputs(run_dir, cfg.stages)
    check_systems([system], list(outputs))
    return SystemFactory(SimpleNamespace(cfg=cfg, outputs=outputs), [system])(system)


def finished_outputs(run_dir: Path, stages: Sequence[str]) -> dict[str, dict]:
    """Results of the run's finished stages, by stage id: what SystemFactory reads as `ctx.outputs`."""
    states = {stage: read_json(run_dir / stage / "state.json") or {} for stage in stages}
    return {stage: state["result"] for stage, state in states.items() if state.get("complete")}


@register_model(MODEL_NAME)
class PersonaFuseLM(LM):
    """One system of one run; model_args: run=RUN_DIR, system=NAME (default personafuse)."""

    def __init__(self, run: str, system: str = "personafuse", batch_size: int | str | None = None,
                 device: Optional[str] = None, **_lm_eval_extras) -> None:
        super().__init__()  # _lm_eval_extras: e.g. max_batch_size, which SystemFactory's batching makes moot
        self.chat = load_system(run, system, usable_device(device))
        if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
            self.chat.batch_size = int(batch_size)
        self.run_dir, self.system = str(run), system
        # lm-eval hands back only the rendered text; routing and the persona prompt need the messages
        self._conversations: dict[str, list[dict]] = {}

    @property
    def tokenizer_name(self) -> str:
        return str(self.chat.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        return self.chat.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the system's model sees it (persona prompt included)."""
        if not add_generation_prompt:
            raise ValueError("personafuse: tasks with gen_prefix (a prefilled assistant turn) are not supported; "
                             "the systems reply after the generation prompt")
        conversation = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        text = self.chat.tokenizer.apply_chat_template(self.chat.prompted(conversation), add_generation_prompt=True,
                                                       tokenize=False)
        self._conversations[text] = conversation
        return text

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests sharing a context are scored together: one prompt pass, its KV cache shared."""
        by_context: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_context.setdefault(request.args[0], []).append(i)
        contexts = list(by_context)
        options = [[requests[i].args[1] for i in by_context[c]] for c in contexts]
        scores, _ = self.chat.option_scores_gated([self._conversation(c) for c in contexts], options)
        out: list = [None] * len(requests)
        for context, row in zip(contexts, scores):
            for i, (logp, greedy) in zip(by_context[context], row):
                out[i] = (logp, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "personafuse: loglikelihood_rolling (perplexity of raw text) is not defined for chat systems, "
            "whose gates come from a conversation; score the run's base model with lm-eval's `hf` model instead")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy replies under the routed gates, cut at the task's stop strings; requests with the
        same generation settings are batched."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        for members in groups.values():
            max_new, until = greedy_settings(requests[members[0]].args[1])
            texts, _ = self.chat.generate_gated([self._conversation(requests[i].args[0]) for i in members], max_new)
            for i, text in zip(members, texts):
                out[i] = cut_at(text, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _conversation(self, context: str) -> list[dict]:
        try:
            return self._conversations[context]
        except KeyError:
            raise ValueError(
                "personafuse: a request context this model did not render; its systems score conversations, so run "
                "lm-eval with --apply_chat_template (Python: apply_chat_template=True) and without --cache_requests. "
                f"Context: {context[:80]!r}") from None


def usable_device(requested: Optional[str]) -> Optional[str]:
    """The device lm-eval asks for, or None (the run's `model.device`) when this machine has no CUDA:
    lm-eval's CLI asks for cuda:0 unless told otherwise, which would fail on every CPU machine."""
    import torch

    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("personafuse: lm-eval asked for device %s, which this machine lacks; "
                                            "using the run's model.device", requested)
        return None
    return requested


def greedy_settings(gen_kwargs: dict) -> tuple[int, list[str]]:
    """(max new tokens, stop strings) from lm-eval's generation kwargs; sampling is refused, since the
    project's systems decode greedily (a silently greedy 'sampled' run would mislead)."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
        raise ValueError("personafuse: generation_kwargs ask for sampling (do_sample/temperature); "
                         "the systems decode greedily")
    unknown = sorted(k for k in kwargs if k not in _SAMPLING_ONLY)
    if unknown:
        raise ValueError(f"personafuse: unsupported generation_kwargs {unknown} (known: until, max_gen_toks, "
                         f"do_sample, temperature, {', '.join(_SAMPLING_ONLY)})")
    return max_new, [until] if isinstance(until, str) else list(until)


def cut_at(text: str, until: Sequence[str]) -> str:
    """The reply up to the first stop string (greedy decoding: stopping later changes nothing before it)."""
    cuts = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def evaluate_tasks(run_dir: str | Path, system: str, tasks: list, output: Optional[str | Path] = None,
                   limit: Optional[float] = None, num_fewshot: Optional[int] = None,
                   include_path: Optional[str | Path] = None, batch_size: Optional[int] = None,
                   device: Optional[str] = None, log_samples: bool = False, include_defaults: bool = True) -> dict:
    """lm-eval's `simple_evaluate` on one system of a run, its results JSON written to `output`.

    This wraps lm-eval rather than converting our evaluate records to its layout: a converter would
    only relabel our own numbers, while here lm-eval's tasks, prompts, metrics and aggregation make
    the numbers, so the file is what `lm_eval --output_path` writes for any of its tasks and compares
    with other models' lm-eval results as they are. `include_defaults=False` skips indexing lm-eval's
    own task folder (~7 s) when only tasks under `include_path` are run."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"run": str(run_dir), "system": system}
    results = simple_evaluate(model=MODEL_NAME, model_args=model_args, tasks=tasks, limit=limit,
                              num_fewshot=num_fewshot, batch_size=batch_size, device=device,
                              apply_chat_template=True, fewshot_as_multiturn=True, log_samples=log_samples,
                              task_manager=TaskManager(include_path=str(include_path) if include_path else None,
                                                       include_defaults=include_defaults))
    if output is not None:
        write_results(results, output)
    return results


def write_results(results: dict, output: str | Path) -> Path:
    """The results JSON as lm-eval's tracker writes it (per-sample logs left out, as lm-eval keeps
    them in separate files), atomically: temporary file, then rename."""
    from lm_eval.utils import handle_non_serializable

    aggregated = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_text(output, json.dumps(aggregated, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return Path(output)


def main() -> None:
    """lm-eval's own CLI, with the `personafuse` model registered (importing this module did that)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
