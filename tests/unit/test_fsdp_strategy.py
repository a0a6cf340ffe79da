"""The FSDP ids build what Lightning needs, and fsdp_cpu gets past what only a GPU passes."""
from __future__ import annotations

import pytest


def test_fsdp_shards_transformer_blocks_with_the_original_parameters():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from experiments.config import TrainerConfig
    from lightning_modules.common import build_strategy, is_fsdp, is_zero3

    strategy = build_strategy(TrainerConfig(strategy="fsdp"))
    assert type(strategy) is FSDPStrategy and is_fsdp(strategy) and not is_zero3(strategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen base and trainable experts share units
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)


def test_the_wrap_policy_picks_the_decoder_layers_of_a_causal_lm(tiny_model):
    """GradientCheckpointingLayer is the decoder layers' base class: each block is one unit, nothing else."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = tiny_model
    units = [name for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    assert units == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]


def test_lightning_refuses_fsdp_on_cpu_but_takes_fsdp_cpu():
    import lightning as L

    from experiments.config import TrainerConfig
    from lightning_modules.common import build_strategy, is_fsdp

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=build_strategy(TrainerConfig(strategy="fsdp")), logger=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=build_strategy(TrainerConfig(strategy="fsdp_cpu")), logger=False)
    assert is_fsdp(trainer.strategy) and trainer.strategy.process_group_backend == "gloo"
    assert trainer.strategy.kwargs["use_orig_params"] is True


@pytest.mark.parametrize("shard, kind", [(True, "FSDP"), (False, "DDPStrategy")])
def test_a_small_model_runs_data_parallel_under_an_fsdp_id(tmp_path, shard, kind):
    """build_trainer(shard=False), the router's: FSDP ids become DDP, same backend."""
    from experiments.config import TrainerConfig
    from lightning_modules.common import build_trainer

    cfg = TrainerConfig(strategy="fsdp_cpu", devices=2)
    trainer = build_trainer(cfg, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "run", max_steps=1, checkpoint=False,
                            shard=shard)
    assert kind in type(trainer.strategy).__name__
    assert trainer.strategy.process_group_backend == "gloo"

