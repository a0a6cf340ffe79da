"""The persona LoRA layer: E low-rank experts on one frozen linear layer, mixed by per-sequence gates.

    y = W0·x + Σ_e g_e · (α/r) · B_e A_e x

All experts are one fused low-rank product (A stacked to [E·r, in], B to [out, E·r]) instead of
E passes. When every sequence is gated to a single expert (adapter SFT), each example gathers
its own expert's A and B instead, so an example costs one expert, not E.
Gates are set once per batch (`PersonaLoRAModel.gates(g)`) and stay fixed while generating,
which keeps the KV cache valid. No Lightning here.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn


class GateState:
    """The gates shared by every persona layer of one model, plus how to apply them."""

    def __init__(self) -> None:
        self.gates: Optional[torch.Tensor] = None
        self.onehot_index: Optional[torch.Tensor] = None
        self.onehot_weight: Optional[torch.Tensor] = None
        self.all_zero = True

    def set(self, gates: Optional[torch.Tensor]) -> None:
        """Decide the cheapest exact path once per batch, not once per layer call."""
        self.gates, self.onehot_index, self.onehot_weight = gates, None, None
        self.all_zero = gates is None or not bool(gates.detach().ne(0).any())
        if self.all_zero:
            return
        if bool((gates.detach().ne(0).sum(dim=1) <= 1).all()):
            self.onehot_index = gates.detach().abs().argmax(dim=1)
            self.onehot_weight = gates.gather(1, self.onehot_index[:, None])[:, 0]


class PersonaLoRALinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts; reads its gates from a shared GateState."""

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float, state: GateState):
        super().__init__()
        self.base = base
        self.num_experts, self.r, self.scaling = num_experts, r, alpha / r
        self.state = state
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's LoRA init: A kaiming-uniform, B zero, so a new expert starts as the identity.
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        st = self.state
        if st.all_zero:
            return out
        h = self.dropout(x).to(self.lora_A.dtype)
        if st.onehot_index is not None:
            delta = self._gathered(h, st.onehot_index, st.onehot_weight)
        else:
            delta = self._fused(h, st.gates)
        return out + delta.to(out.dtype)

    def _fused(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """All experts at once: [.., in] -> [.., E·r], scale by gates, -> [.., out]."""
        E, r = self.num_experts, self.r
        a = self.lora_A.reshape(E * r, -1)
        b = self.lora_B.permute(1, 0, 2).reshape(self.base.out_features, E * r)
        h = x @ a.t()
        scale = (gates.to(h.dtype) * self.scaling).repeat_interleave(r, dim=1)  # [B, E·r]
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), -1)
        return h @ b.t()

    def _gathered(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One expert per sequence: batched matmul with each example's own A and B."""
        a, b = self.lora_A[index], self.lora_B[index]  # [B, r, in], [B, out, r]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * (weight.to(delta.dtype) * self.scaling)[:, None, None]
        return delta.reshape(*x.shape[:-1], -1)


class PersonaLoRAModel(nn.Module):
    """A causal LM whose target linear layers carry persona experts, plus gate control and PEFT I/O."""

    def __init__(
        self,
        base_model: nn.Module,
        expert_names: Sequence[str],
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        self.base_model = base_model
        self.expert_names = list(expert_names)
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.target_modules = list(target_modules)
        self.state = GateState()
        self.layer_names = self._inject(base_model)
        if not self.layer_names:
            raise ValueError(f"no nn.Linear named any of {self.target_modules} in {type(base_model).__name__}")
        self.base_model.requires_grad_(False)
        for layer in self.persona_layers():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)

    def _inject(self, model: nn.Module) -> list[str]:
        names = []
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in self.target_modules and isinstance(module, nn.Linear):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                layer = PersonaLoRALinear(module, len(self.expert_names), self.r, self.alpha, self.dropout_p, self.state)
                setattr(parent, leaf, layer)
                names.append(name)
        return names

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def config(self):
        return self.base_model.config

    def persona_layers(self) -> Iterator[PersonaLoRALinear]:
        for name in self.layer_names:
            yield self.base_model.get_submodule(name)

    def set_gates(self, gates: Optional[torch.Tensor]) -> None:
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.num_experts):
            raise ValueError(f"gates must be [batch, {self.num_experts}], got {tuple(gates.shape)}")
        self.state.set(gates)

    @contextmanager
    def gates(self, gates: Optional[torch.Tensor]) -> Iterator[None]:
        """Hold `gates` for every forward (and every generated token) inside the block."""
        previous = self.state.gates
        self.set_gates(gates)
        try:
            yield
        finally:
            self.state.set(previous)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the experts: what checkpoints and exports hold."""
        return {k: v for k, v in self.state_dict().items() if ".lora_A" in k or ".lora_B" in k}

    # ------------------------------------------------------------------ PEFT interchange

    def export_peft(self, expert: str, folder: str | Path, base_model_name: str = "") -> Path:
        """Write one expert as a standard PEFT LoRA adapter folder (PeftModel.from_pretrained loads it)."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        from datamodules.io import atomic_write_bytes

        e = self.expert_names.index(expert)
        tensors = {}
        for name, layer in zip(self.layer_names, self.persona_layers()):
            # .clone(): under ZeRO-3 the caller gathers first; here we detach from shared storage.
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[e].detach().cpu().clone().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[e].detach().cpu().clone().contiguous()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout_p, task_type="CAUSAL_LM",
            target_modules=sorted({n.rsplit(".", 1)[-1] for n in self.layer_names}),
            base_model_name_or_path=base_model_name or None,
        )
        tmp = folder / "adapter_model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / "adapter_model.safetensors")
        atomic_write_bytes(folder / "adapter_config.json", json.dumps(config.to_dict(), indent=2, default=list).encode())
        return folder

    def load_peft(self, expert: str, folder: str | Path) -> None:
        """Load a PEFT LoRA adapter folder into one expert slot; shapes and names must match exactly."""
        from safetensors.torch import load_file

        folder = Path(folder)
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
        tensors = load_file(str(weights_file))
        config = json.loads((folder / "adapter_config.json").read_text())
        if int(config.get("r", -1)) != self.r or float(config.get("lora_alpha", -1)) != float(self.alpha):
            raise ValueError(f"{folder}: adapter r/alpha {config.get('r')}/{config.get('lora_alpha')} != model {self.r}/{self.alpha}")
        e = self.expert_names.index(expert)
        for name, layer in zip(self.layer_names, self.persona_layers()):
            for part, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                key = f"base_model.model.{name}.{part}.weight"
                if key not in tensors:
                    raise ValueError(f"{weights_file}: missing tensor {key} (adapter for another base model?)")
                if tensors[key].shape != param[e].shape:
                    raise ValueError(f"{weights_file}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param[e].shape)}")
                with torch.no_grad():
                    param[e].copy_(tensors[key].to(param.dtype))
