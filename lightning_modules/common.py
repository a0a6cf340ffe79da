"""Pieces every training stage shares: the Trainer, strategies, the persona model builder, seeding.

Stages share these functions rather than a base class.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from datamodules.io import DataError
from lightning_modules.strategies import STRATEGIES

if TYPE_CHECKING:
    from experiments.config import LoraConfig, ModelConfig, TrainerConfig


def persona_model_factory(model_cfg: ModelConfig, lora: LoraConfig, expert_names: Sequence[str]) -> Callable:
    """A zero-argument builder, so the model can be created inside `configure_model` (ZeRO-3)."""

    def build():
        from lightning_modules.components.base_model import load_configured
        from lightning_modules.components.persona_lora import PersonaLoRAModel

        base, _ = load_configured(model_cfg)
        return PersonaLoRAModel(base, expert_names, lora.r, lora.alpha, lora.dropout, lora.target_modules)

    return build


def load_experts(model_cfg: ModelConfig, lora: LoraConfig, adapters_dir: str, expert_names: Sequence[str],
                 extra: Optional[dict[str, str]] = None):
    """(PersonaLoRAModel holding each expert's exported PEFT adapter, tokenizer) on the configured device;
    used by evaluate and joint. `extra` (name -> adapter folder) stacks more adapters of the same
    rank after the named experts (evaluate: the SFT baseline as one more expert)."""
    from lightning_modules.components.base_model import load_configured, pick_device
    from lightning_modules.components.persona_lora import PersonaLoRAModel

    folders = {name: Path(adapters_dir) / name for name in expert_names}
    folders.update({name: Path(folder) for name, folder in (extra or {}).items()})
    base, tok = load_configured(model_cfg)
    model = PersonaLoRAModel(base, list(folders), lora.r, lora.alpha, 0.0, lora.target_modules)
    for name, folder in folders.items():
        model.load_peft(name, folder)
    return model.to(pick_device(model_cfg.device)).eval(), tok


CPU_STRATEGIES = ("ddp_cpu", "fsdp_cpu")
"""Strategy ids that run on CPU processes (gloo) whatever trainer.accelerator says."""
REPLICATED = {"fsdp": "ddp", "fsdp_cpu": "ddp_cpu"}
"""The data-parallel id a stage with a small model runs instead of a sharded one (`build_trainer(shard=False)`)."""


def build_strategy(t: TrainerConfig, find_unused_parameters: bool = False):
    """`t.strategy`, a registered id (lightning_modules/strategies.py) -> what Lightning's Trainer accepts.

    find_unused_parameters: for modules whose loss may skip some parameters (the router's
    contrastive head when that loss is off); DDP would otherwise stop with an error.
    """
    return STRATEGIES.get(t.strategy)(t, find_unused_parameters)


def predict_trainer(t: TrainerConfig, spread: bool, cpu: bool = False, **extra) -> L.Trainer:
    """A Trainer for predict loops (datagen's local teacher, evaluate), without logger or checkpoints.

    spread: use every configured device and node (a DDP strategy splits the work over ranks; "auto"
    lets Lightning replicate over the devices); else one device, one process. Sharded training
    strategies (FSDP, DeepSpeed) buy nothing for inference and become "auto". cpu: force the CPU.
    """
    accelerator = "cpu" if cpu or t.strategy in CPU_STRATEGIES else t.accelerator
    ddp = spread and t.strategy in ("ddp", "ddp_cpu")
    return L.Trainer(accelerator=accelerator, devices=t.devices if spread else 1, num_nodes=t.num_nodes if spread else 1,
                     strategy=build_strategy(t) if ddp else "auto", logger=False,
                     enable_checkpointing=False, enable_model_summary=False, **extra)


def is_zero3(strategy) -> bool:
    """Whether parameters are partitioned across ranks (DeepSpeed ZeRO stage 3)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def is_fsdp(strategy) -> bool:
    """Whether parameters are sharded across ranks by torch's FSDP (ids fsdp, fsdp_cpu)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def fsdp_wrapped(strategy, module: torch.nn.Module) -> torch.nn.Module:
    """`module` sharded by FSDP as a whole, root included, when called in `configure_model`; else unchanged.

    Left to Lightning, FSDP wraps the LightningModule anew at every Trainer call, but the blocks it
    wrapped at the first call stay wrapped, so the next call sees "already wrapped", skips the root,
    and the root's tensors (embeddings, lm_head) stay as 1-D shards: `trainer.validate` before or
    after `fit` fails with "'weight' must be 2-D" (Lightning issue #19015). Wrapped here once, the
    model is whole for every call. `wrap` takes the strategy's policy, precision and sharding from
    Lightning's `model_sharded_context`; device_id is the root device because torch's FSDP refuses
    CPU modules without one (Lightning passes the device index, None on CPU).
    """
    if not is_fsdp(strategy):
        return module
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import wrap

    wrapped = wrap(module, device_id=strategy.root_device)
    if not isinstance(wrapped, FullyShardedDataParallel):  # `wrap` is a silent no-op outside that context
        raise RuntimeError("fsdp_wrapped must be called in LightningModule.configure_model, where Lightning "
                           "enters the FSDP wrapping context")
    return wrapped


def clip_gradients(module: L.LightningModule, root: torch.nn.Module, optimizer, clip_val, algorithm) -> None:
    """A stage's `configure_gradient_clipping`: norm clipping under FSDP runs on the FSDP root `root`.

    The norm of sharded gradients needs every rank's shard, which only the root's `clip_grad_norm_`
    all-reduces; Lightning's FSDP precision plugin refuses norm clipping because it cannot find that
    root. Anything else (no FSDP, clipping by value, no clipping) is Lightning's own `clip_gradients`.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel) and clip_val and algorithm in (None, "norm"):
        root.clip_grad_norm_(clip_val)
    else:
        module.clip_gradients(optimizer, clip_val, algorithm)


@contextmanager
def gathered_parameters(strategy, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of sharded parameters inside the block (to export adapters); a no-op otherwise.

    ZeRO-3: gathers `params` on every rank. FSDP: gathers whole units (FSDP cannot gather single
    tensors) of every FSDP module in the LightningModule, on rank 0 only (the rank that writes
    files), copied to CPU off a GPU so a rank holds one full model at most in host memory, not GPU
    memory. Either way this is a collective: every rank must enter it, not only the one that writes.
    """
    if is_fsdp(strategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # No offload on CPU (nowhere to go) nor for one process (FSDP runs NO_SHARD then and refuses it).
        offload = strategy.root_device.type != "cpu" and strategy.world_size > 1
        with FullyShardedDataParallel.summon_full_params(strategy.lightning_module, writeback=False, rank0_only=True,
                                                         offload_to_cpu=offload):
            yield
        return
    if not is_zero3(strategy):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


@contextmanager
def zero3_model_init(strategy) -> Iterator[None]:
    """Let `from_pretrained` load real weights into ZeRO-3 shards inside `configure_model`.

    Lightning runs configure_model under deepspeed.zero.Init; transformers only loads a checkpoint
    into partitioned parameters while a stage-3 HfDeepSpeedConfig is alive. Without it, loading
    fails in the model's weight init on the already-partitioned (empty) embedding.
    """
    if not is_zero3(strategy):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(strategy.config)  # transformers keeps only a weak reference
    try:
        yield
    finally:
        del alive


# The frozen base model sits in eval mode on purpose (no dropout in frozen layers); Lightning warns
# about every such module at the start of each fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# FSDP warns (per block, per Trainer call) that a unit mixing frozen and trainable tensors gets a
# gradient buffer for all of it: the block's size, not the experts'. Known and accepted: the experts
# sit inside the blocks (PersonaLoRALinear reads its frozen weight directly), so they cannot be units
# of their own. Cost: one gradient-sized copy of the model, sharded (Llama-3.1-8B in bf16 on 8 GPUs:
# ~2 GB per GPU, about 17x the experts' own 13M parameters per block at r=16 with ten experts).
warnings.filterwarnings("ignore", message=r".* has both parameters with requires_grad=True and False")


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device supports it: one kernel for the
    ten experts' many small tensors (measured 0.112 s -> 0.036 s per step on CPU), else the default."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class LastStepCheckpoint(ModelCheckpoint):
    """Also writes last.ckpt again after a validation that ran at a step it had just saved.

    Lightning saves a step's checkpoint at its batch end, before that step's validation, and skips
    saving a step twice. The best-step callback's state (best file and score) rides in last.ckpt, so
    without the second write a run killed after a validation that found a new best would resume
    pointing at the previous best file, which that validation has already deleted.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved_this_step = getattr(self, "_last_global_step_saved", None) == trainer.global_step
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if saved_this_step and fitting and self.last_model_path:
            trainer.save_checkpoint(self.last_model_path)


class RandomStateCheckpoint(Callback):
    """Saves the Python and torch random generators in each checkpoint and restores them on resume.

    Lightning checkpoints hold the weights, optimizer and loop positions but not the RNG, so LoRA
    dropout after a resume would draw other masks than the uninterrupted run. (Lightning only
    offers this privately, in `lightning.fabric.utilities.seed`.) Under DDP the checkpoint holds
    rank 0's state and every rank restores it; the ranks are seeded alike anyway (seed_everything).
    """

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def build_trainer(
    cfg: TrainerConfig,
    stage_dir: Path,
    tracking_uri: str,
    run_id: str,
    max_steps: int,
    max_epochs: int = -1,
    checkpoint: bool = True,
    extra_callbacks: Optional[list] = None,
    find_unused_parameters: bool = False,
    keep_best: Optional[str] = None,
    shard: bool = True,
) -> L.Trainer:
    """A Trainer that logs into the stage's MLflow run and checkpoints into the stage folder.

    keep_best: a validation metric to minimise; the validated step with its lowest value is also
    kept, as checkpoints/best-step=N.ckpt (see `best_checkpoint`).
    shard=False: FSDP ids become their DDP counterpart (REPLICATED), for a model whose every
    replica fits easily (the router's MLP): sharding it buys no memory and costs a gather per step."""
    callbacks = [TQDMProgressBar(refresh_rate=1)] + list(extra_callbacks or [])
    if checkpoint:
        if keep_best:  # listed before the last-step callback so that it runs first at validation end
            callbacks.append(ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="best-{step}", monitor=keep_best,
                                             mode="min", save_top_k=1, save_on_train_epoch_end=False))
        last = LastStepCheckpoint if keep_best else ModelCheckpoint
        callbacks.append(last(
            dirpath=stage_dir / "checkpoints", filename="{step}", save_last=True, save_top_k=1,
            monitor=None, every_n_train_steps=max(1, cfg.checkpoint_every_n_steps), save_on_train_epoch_end=True,
        ))
        callbacks.append(RandomStateCheckpoint())
    logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
    accelerator = "cpu" if cfg.strategy in CPU_STRATEGIES else cfg.accelerator
    if not shard and cfg.strategy in REPLICATED:
        cfg = dataclasses.replace(cfg, strategy=REPLICATED[cfg.strategy])
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg, find_unused_parameters),
        precision=cfg.precision,
        max_steps=max_steps,
        max_epochs=max_epochs,
        val_check_interval=cfg.val_check_interval,
        check_val_every_n_epoch=None if cfg.val_check_interval else 1,
        log_every_n_steps=cfg.log_every_n_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=checkpoint,
        default_root_dir=str(stage_dir),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        inference_mode=False,  # torchmetrics states are updated in validation; no_grad suffices
    )


def best_checkpoint(trainer: L.Trainer) -> Optional[str]:
    """The step `build_trainer(keep_best=...)` kept, if its file is there; None otherwise (possible only
    for a run killed between a validation that found a new best and last.ckpt's second write)."""
    kept = [c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    return next((path for path in kept if path and Path(path).exists()), None)


def last_checkpoint(stage_dir: Path) -> Optional[str]:
    """The checkpoint to resume from, if an earlier attempt of this stage saved one."""
    last = stage_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None  # a folder under DeepSpeed, a file otherwise


@contextmanager
def refusing_unsafe_checkpoint(path: Optional[str]) -> Iterator[None]:
    """Around a Trainer call given `ckpt_path=path, weights_only=True`: a checkpoint that holds anything
    but tensors and plain containers (a planted or tampered file) is refused in one line naming it,
    where torch < 2.6, which pyproject allows, would have unpickled it and run what it names.

    DeepSpeed checkpoint folders are read by DeepSpeed's own loader (weights_only=False as of
    DeepSpeed 0.19); this guard does not cover them (README, Reliability)."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")  # names what it holds
        raise DataError(f"{path}: refused to load this checkpoint: it holds more than tensors and plain values "
                        f"({reason[:200]}); delete it to start the stage over") from None


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(False)
