"""The persona LoRA layer: E low-rank experts on one frozen linear layer, mixed by per-sequence gates.

    y = W0·x + Σ_e g_e · (α/r) · B_e A_e x

Two exact paths compute the sum, chosen per call by cost (`GateState.use_sparse`):
- fused: all experts as one low-rank product (A stacked to [E·r, in], B to [out, E·r]) instead
  of E passes; for a few tokens at a time (decoding) the B side is one batched matmul over
  experts, so B is never re-laid-out per token. Gates of zero cost their full share.
- sparse: when each row has at most k < E non-zero gates, each row gathers its own k experts'
  A and B and runs batched matmuls with them, so a row costs k experts, not E. The gather copies
  k experts per row, which pays once a row has enough tokens (prefill, training; one expert per
  row, as in adapter SFT, always pays); one decoded token at a time with k > 1 stays fused.
The gate vector is a value: `model(..., gates=g)` and `model.generate(..., gates=g)` hold g for
the call (fixed for every generated token, which keeps the KV cache valid); gates=None is exactly
the base model.

Merging is its own explicit step: when every row of a batch shares one gate vector (batch 1, or
identical gates) and no gradient is needed, `with model.merged(g):` folds Σ_e g_e·(α/r)·B_e A_e
into the base weights once, so each decoded token of a call with gates=g costs what the base model
costs; leaving the block restores the base weights bit-exactly (see `PersonaLoRALinear.merge_`).
No Lightning here.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Below this many new tokens per conversation, folding the experts into the weights (two
# out×in×(k·r) matmuls per layer, merge and restore) costs more than it saves; see benchmarks/.
MERGE_PAYS_FROM_TOKENS = 32
# Fused path: at most this many tokens per call (×r) use the per-expert batched matmul for B
# (no [out, E·r] copy of B); longer inputs (prefill, training) pay the copy once for a single matmul.
_BMM_MAX_TOKENS_PER_RANK = 4
# Sparse path: what gathering one expert weight for a row costs, in multiply-adds of the fused
# path (measured on CPU, benchmarks/throughput.py). A row of T tokens with k active experts is
# gathered when k·(COST + T) < E·T: always for k = 1 at E = 10; for k = 3 from about 4 tokens on.
SPARSE_GATHER_COST = 8


class GateState:
    """The gates shared by every persona layer of one model, plus how to apply them."""

    def __init__(self) -> None:
        self.gates: Optional[torch.Tensor] = None
        self.sparse_index: Optional[torch.Tensor] = None
        """[B, k]: each row's experts with a non-zero gate (padded with zero-gated ones), when k < E."""
        self.sparse_weight: Optional[torch.Tensor] = None
        self.all_zero = True
        self.merged = False
        """True while the gated experts are folded into the base weights: layers skip the experts."""
        self._scales: dict = {}

    def set(self, gates: Optional[torch.Tensor]) -> None:
        """Find each row's active experts once per batch, not once per layer call."""
        self.gates, self.sparse_index, self.sparse_weight = gates, None, None
        self.merged, self._scales = False, {}
        self.all_zero = gates is None or not bool(gates.detach().ne(0).any())
        if self.all_zero:
            return
        if gates.requires_grad and torch.is_grad_enabled():
            return  # the gradient of a zero gate is not zero: only the dense path gives it (joint stage)
        k = int(gates.detach().ne(0).sum(dim=1).max())
        if k < gates.shape[1]:
            self.sparse_index = gates.detach().abs().topk(k, dim=1).indices.sort(dim=1).values
            self.sparse_weight = gates.gather(1, self.sparse_index)

    def use_sparse(self, tokens_per_row: int) -> bool:
        """Whether gathering each row's k experts costs less than running all E (see SPARSE_GATHER_COST)."""
        if self.sparse_index is None:
            return False
        k, experts = self.sparse_index.shape[1], self.gates.shape[1]
        return k * (SPARSE_GATHER_COST + tokens_per_row) < experts * tokens_per_row

    def scale(self, r: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """[B, E·r] gate × α/r per rank column; built once per batch (every layer shares it) when no grad flows."""
        if torch.is_grad_enabled():  # the gates may come from the router (joint stage): keep one graph per use
            return (self.gates.to(dtype) * scaling).repeat_interleave(r, dim=1)
        key = (r, scaling, dtype)
        if key not in self._scales:
            self._scales[key] = (self.gates.to(dtype) * scaling).repeat_interleave(r, dim=1)
        return self._scales[key]


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
        st = self.state
        # F.linear, not self.base(x): one module call per layer fewer, which decoding notices.
        out = F.linear(x, self.base.weight, self.base.bias)
        if st.all_zero or st.merged:
            return out
        h = self.dropout(x).to(self.lora_A.dtype)
        if st.use_sparse(h.numel() // (h.shape[0] * h.shape[-1])):
            delta = self._gathered(h, st.sparse_index, st.sparse_weight)
        else:
            delta = self._fused(h, st.scale(self.r, self.scaling, h.dtype))
        return out + delta.to(out.dtype)

    def _fused(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """All experts at once: [.., in] -> [.., E·r], scale by gates ([B, E·r]), -> [.., out]."""
        E, r, out_features = self.num_experts, self.r, self.base.out_features
        h = x @ self.lora_A.reshape(E * r, -1).t()  # a view of A: no copy
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), -1)
        tokens = h.numel() // (E * r)
        if tokens <= _BMM_MAX_TOKENS_PER_RANK * r:
            # Decoding: Σ_e h_e B_eᵀ as one bmm over experts on B's own layout ([E, out, r] -> [E, r, out] view).
            per_expert = torch.bmm(h.reshape(tokens, E, r).transpose(0, 1), self.lora_B.transpose(1, 2))
            return per_expert.sum(0).view(*h.shape[:-1], out_features)
        b = self.lora_B.permute(1, 0, 2).reshape(out_features, E * r)  # one copy of B, amortised over many tokens
        return h @ b.t()

    def _gathered(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each sequence's own k experts ([B, k] index and gates): batched matmuls with its A and B."""
        rows, k = index.shape
        a = self.lora_A[index].reshape(rows, k * self.r, -1)  # [B, k·r, in]
        b = self.lora_B[index].permute(0, 2, 1, 3).reshape(rows, -1, k * self.r)  # [B, out, k·r]
        flat = x.reshape(rows, -1, x.shape[-1])
        h = torch.bmm(flat, a.transpose(1, 2))
        if k == 1:  # one expert: scale the output (the order adapter SFT has always used)
            delta = torch.bmm(h, b.transpose(1, 2)) * (weight.to(h.dtype) * self.scaling)[:, :, None]
        else:
            h = h * (weight.to(h.dtype) * self.scaling).repeat_interleave(self.r, dim=1)[:, None, :]
            delta = torch.bmm(h, b.transpose(1, 2))
        return delta.reshape(*x.shape[:-1], -1)

    # ------------------------------------------------------------------ merge into the base weight

    def delta_factors(self, gates: torch.Tensor, workspace: Optional[dict] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(B', A') with B'A' = Σ_e g_e·(α/r)·B_e A_e: [out, k·r] and [k·r, in] float32 over the k experts
        with a non-zero gate (None if there is none). B'A' is deterministic for given experts, gates,
        block rows and thread count, which `unmerge_` relies on to undo `merge_`."""
        scale = gates.detach().to(device=self.lora_A.device, dtype=torch.float32) * self.scaling
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if not bool(scale.ne(0).all()):
            active = scale.nonzero()[:, 0]
            if active.numel() == 0:
                return None
            a, b, scale = a[active], b[active], scale[active]
        k, kr, out_features = scale.shape[0], scale.shape[0] * self.r, self.base.out_features
        workspace = {} if workspace is None else workspace
        a_out = _buffer(workspace, "a", kr * a.shape[-1], torch.float32, a.device)[: kr * a.shape[-1]].view(kr, -1)
        b_out = _buffer(workspace, "b", out_features * kr, torch.float32, b.device)[: out_features * kr]
        torch.mul(a.reshape(kr, -1), scale.repeat_interleave(self.r)[:, None], out=a_out)  # gates folded into A
        b_out.view(out_features, k, self.r).copy_(b.permute(1, 0, 2))  # [out, k·r] without a temporary
        return b_out.view(out_features, kr), a_out

    def merged_delta(self, gates: torch.Tensor) -> Optional[torch.Tensor]:
        """Σ_e g_e·(α/r)·B_e A_e as one [out, in] float32 matrix (None if every gate is zero)."""
        factors = self.delta_factors(gates)
        return None if factors is None else factors[0] @ factors[1]

    def _row_blocks(self) -> list[tuple[int, int]]:
        rows = max(1, _MERGE_BLOCK_ELEMENTS // self.base.in_features)
        out = self.base.out_features
        return [(start, min(out, start + rows)) for start in range(0, out, rows)]

    @torch.no_grad()
    def merge_(self, gates: torch.Tensor, workspace: Optional[dict] = None,
               restore: str = "recompute") -> Optional["MergeRecord"]:
        """W ← W + ΔW in place; returns what `unmerge_` needs to give W back bit for bit.

        Restoring by subtraction, W = (W + ΔW) − ΔW, is exact except where the sum rounded across
        a binade (or W ≈ 0): those few elements (about 2% for trained-size deltas) keep their
        original bits, as a 1-byte difference in units in the last place when it fits (else the
        value); a block of rows where that would cost more than a copy is copied instead. Memory
        is thus O(mismatches) — about 5 bytes per mismatch — not a second copy of the base weights;
        the price is recomputing ΔW on restore. Work goes in blocks of rows (~1 MB) through
        buffers shared by all layers (`workspace`), so temporaries are few, reused and cache-resident.

        restore="copy" keeps a plain copy of W instead: no mismatch bookkeeping and no second
        matmul on restore (about half the merge+restore time), for one extra copy of the weight.
        """
        workspace = {} if workspace is None else workspace
        factors = self.delta_factors(gates, workspace)
        if factors is None:
            return None
        w = self.base.weight.data
        if restore == "copy" or not w.is_contiguous():  # (row blocks need flat views)
            original = w.clone()
            b, a = factors
            for start, end in self._row_blocks():
                w[start:end] = (w[start:end].float() + b[start:end] @ a).to(w.dtype)
            return MergeRecord([(0, w.shape[0], "copy", original, None)], None, None, 0, (-1, -1))
        b, a = factors
        bits, in_features = _INT_OF_SIZE[w.element_size()], self.base.in_features
        fp32 = w.dtype == torch.float32
        size = self._row_blocks()[0][1] * in_features
        delta_buf = _buffer(workspace, "delta", size, torch.float32, w.device)
        merged_buf = _buffer(workspace, "merged", size, w.dtype, w.device)
        mask_buf = _buffer(workspace, "mask", size, torch.bool, w.device)
        record = MergeRecord([], w.numel(), w.view(-1)[_probe_index(w.numel(), w.device)], torch.get_num_threads(),
                             self._expert_versions())
        for start, end in self._row_blocks():
            n = (end - start) * in_features
            block = w[start:end]
            delta = torch.mm(b[start:end], a, out=delta_buf[:n].view(end - start, in_features))
            if fp32:
                merged = torch.add(block, delta, out=merged_buf[:n].view(end - start, in_features))
                restored = torch.sub(merged, delta, out=delta)
            else:
                merged = (block.float() + delta).to(w.dtype)
                restored = (merged.float() - delta).to(w.dtype)
            mask = torch.ne(restored.view(bits), block.view(bits), out=mask_buf[:n].view(end - start, in_features))
            wrong = mask.view(-1).nonzero()[:, 0]
            ulps = block.view(bits).reshape(-1)[wrong].long() - restored.view(bits).reshape(-1)[wrong].long()
            small = wrong.numel() == 0 or int(ulps.abs().max()) <= 127
            cost = wrong.numel() * (4 + (1 if small else w.element_size()))
            if cost >= n * w.element_size():
                record.blocks.append((start, end, "copy", block.clone(), None))
            elif small:
                record.blocks.append((start, end, "ulp8", wrong.to(torch.int32), ulps.to(torch.int8)))
            else:
                record.blocks.append((start, end, "sparse", wrong.to(torch.int32), block.reshape(-1)[wrong]))
            block.copy_(merged)
        return record

    def _expert_versions(self) -> tuple:
        """In-place-write counters of the expert tensors; inference tensors (experts loaded under
        torch.inference_mode, as in the evaluate stage) have none and cannot be changed outside it."""
        return tuple(None if t.is_inference() else t._version for t in (self.lora_A, self.lora_B))

    @torch.no_grad()
    def unmerge_(self, gates: torch.Tensor, record: Optional["MergeRecord"], workspace: Optional[dict] = None) -> None:
        """Undo `merge_` exactly: W ← (W − ΔW) block by block, with the recorded elements put back."""
        if record is None:
            return
        w = self.base.weight.data
        if record.probe is None:
            w.copy_(record.blocks[0][3])
            return
        if self._expert_versions() != record.versions:
            raise RuntimeError("experts changed while merged into the base weights; cannot restore them exactly")
        current = torch.get_num_threads()
        if current != record.threads:  # a CPU matmul's summation order may depend on the thread count
            torch.set_num_threads(record.threads)
        try:
            workspace = {} if workspace is None else workspace
            b, a = self.delta_factors(gates, workspace)
            in_features = self.base.in_features
            delta_buf = _buffer(workspace, "delta", self._row_blocks()[0][1] * in_features, torch.float32, w.device)
            bits = _INT_OF_SIZE[w.element_size()]
            for start, end, kind, payload, values in record.blocks:
                block = w[start:end]
                if kind == "copy":
                    block.copy_(payload)
                    continue
                n = (end - start) * in_features
                delta = torch.mm(b[start:end], a, out=delta_buf[:n].view(end - start, in_features))
                if w.dtype == torch.float32:
                    block.sub_(delta)
                else:
                    block.copy_(block.float() - delta)
                if not payload.numel():
                    continue
                index = payload.long()
                if kind == "ulp8":  # integer arithmetic on the bit patterns: exact by construction
                    flat_bits = block.view(bits).view(-1)
                    flat_bits[index] = flat_bits[index] + values.to(bits)
                else:
                    block.view(-1)[index] = values
        finally:
            if current != record.threads:
                torch.set_num_threads(current)
        if not torch.equal(w.view(-1)[_probe_index(record.probe, w.device)], record.probe_values):
            raise RuntimeError(
                "restoring the base weights after a merge was not bit-exact (ΔW was not reproducible: "
                "was the device changed inside a merged() block?)"
            )


class MergeRecord:
    """How to restore one merged weight: per block of rows, the elements kept aside or a copy."""

    def __init__(self, blocks: list, probe: Optional[int], probe_values, threads: int, versions: tuple[int, int]):
        # probe: the weight's size, from which `_probe_index` rebuilds the checked positions (None: a plain copy)
        self.blocks, self.probe, self.probe_values = blocks, probe, probe_values
        self.threads, self.versions = threads, versions

    @property
    def kept(self) -> int:
        """Elements kept aside because subtraction would not restore them exactly."""
        return sum(p.numel() for _, _, kind, p, _ in self.blocks if kind in ("sparse", "ulp8"))

    @property
    def copied(self) -> int:
        """Elements restored from a copy (blocks where the deltas swamp the weights)."""
        return sum(p.numel() for _, _, kind, p, _ in self.blocks if kind == "copy")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blk in self.blocks for t in blk[3:] if t is not None)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MERGE_BLOCK_ELEMENTS = 1 << 18  # ~1 MB of fp32 per block of rows


def _buffer(workspace: dict, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat scratch tensor of at least `numel` elements, reused across layers within one merge."""
    key = (name, dtype, torch.device(device))
    if key not in workspace or workspace[key].numel() < numel:
        workspace[key] = torch.empty(numel, dtype=dtype, device=device)
    return workspace[key]


def _probe_index(numel: int, device) -> torch.Tensor:
    """≤256 spread positions whose original values are kept to check that a restore was exact."""
    return torch.linspace(0, numel - 1, min(numel, 256), device=device).long().unique()


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
        # While experts are folded into the base weights: how to restore each layer, and the layers
        # themselves (swapped out of the model for their plain nn.Linear, so decoding is the base model's).
        self._merge_records: Optional[list] = None
        self._merged_layers: Optional[list[PersonaLoRALinear]] = None
        self._merge_row: Optional[torch.Tensor] = None
        self.merge_restore = "recompute"
        """How merged weights are restored: "recompute" (ΔW again; O(2%) extra memory) or "copy" (a copy of
        every target weight; about half the merge+restore time, one extra copy of those weights)."""
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
        if self._merged_layers is not None:  # merged: the model holds the plain linears for now
            yield from self._merged_layers
            return
        for name in self.layer_names:
            yield self.base_model.get_submodule(name)

    def _swap(self, modules: Sequence[nn.Module]) -> None:
        """Put `modules` at the target paths (the persona layers, or their merged base linears)."""
        for name, module in zip(self.layer_names, modules):
            parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(self.base_model.get_submodule(parent) if parent else self.base_model, leaf, module)

    def forward(self, *args, gates: Optional[torch.Tensor] = None, **kwargs):
        """The base model's forward with the experts mixed by `gates` ([batch, E]; None: experts off,
        exactly the base model). Inside `merged(g)` a call with gates equal to g costs the base model's."""
        with self.holding(gates):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, gates: Optional[torch.Tensor] = None, **kwargs):
        """The base model's generate with `gates` held fixed for every generated token (the KV cache stays valid)."""
        with self.holding(gates):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def holding(self, gates: Optional[torch.Tensor]) -> Iterator[None]:
        """The persona layers read `gates` inside the block. `forward` and `generate` do this for you;
        call it directly only to run persona layers by hand.

        Inside a `merged(g)` block, gates equal to g (on every row) use the merged weights; any other
        gates (None included) take the experts out for the block and fold them back in after, so a
        call's result never depends on what is merged.
        """
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.num_experts):
            raise ValueError(f"gates must be [batch, {self.num_experts}], got {tuple(gates.shape)}")
        row = self._merged_row
        if row is not None:
            if gates is not None and torch.equal(gates.detach(), row.to(gates.device, gates.dtype).expand_as(gates)):
                yield
                return
            self._unmerge()
            try:
                with self.holding(gates):
                    yield
            finally:
                self._merge(row)
            return
        self.state.set(gates)
        try:
            yield
        finally:
            self.state.set(None)

    @contextmanager
    def merged(self, gates: torch.Tensor, strict: bool = True) -> Iterator[bool]:
        """Fold one gate vector into the base weights for the block: a separate, explicit step that
        only changes speed. Inside it, forward/generate with these gates cost exactly the base model's,
        at any batch size (the target paths hold the merged plain nn.Linear modules, so the model's
        state_dict inside the block is the base model's; the experts stay reachable via
        `persona_layers()`). Leaving the block restores the base weights bit-exactly.

        Merging needs one gate vector shared by every row, no gradient and no active dropout;
        strict=True raises a ValueError saying which is missing, strict=False merges nothing then.
        Yields whether the experts are merged. `merge_restore` chooses memory ("recompute",
        default) or merge speed ("copy").
        """
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.num_experts):
            raise ValueError(f"gates must be [batch, {self.num_experts}], got {tuple(gates.shape)}")
        all_zero = gates is None or not bool(gates.detach().ne(0).any())
        why_not = None if all_zero else self.why_not_mergeable(gates)
        if why_not is not None and strict:
            raise ValueError(f"cannot merge the experts into the base weights: {why_not}")
        if all_zero or why_not is not None:  # all-zero gates: the base model already, nothing to merge
            yield False
            return
        previous = self._merged_row
        self._unmerge()
        self._merge(gates.detach()[0])
        try:
            yield True
        finally:
            self._unmerge()
            if previous is not None:  # an enclosing merged block
                self._merge(previous)

    def why_not_mergeable(self, gates: Optional[torch.Tensor]) -> Optional[str]:
        """None when `gates` can be merged into the base weights exactly; otherwise the reason."""
        if gates is None or not bool(gates.detach().ne(0).any()):
            return "no non-zero gates"
        if gates.shape[0] > 1 and not torch.equal(gates, gates[:1].expand_as(gates)):
            return "rows have different gates (merging needs one gate vector for the whole batch)"
        if torch.is_grad_enabled() and (gates.requires_grad or any(
                p.requires_grad for layer in self.persona_layers() for p in (layer.lora_A, layer.lora_B))):
            return "gradients are enabled (merged weights hide the experts from autograd); use torch.no_grad()"
        if self.training and self.dropout_p > 0:
            return "LoRA dropout is active in training mode; call .eval()"
        weight = next(self.persona_layers()).base.weight
        if weight.numel() == 0 or hasattr(weight, "ds_id"):
            return "the base weights are partitioned (DeepSpeed ZeRO-3)"
        return None

    @property
    def _merged_row(self) -> Optional[torch.Tensor]:
        return None if self._merge_records is None else self._merge_row

    @torch.no_grad()
    def _merge(self, row: torch.Tensor) -> None:
        if self.merge_restore not in ("recompute", "copy"):
            raise ValueError(f"merge_restore must be 'recompute' or 'copy', got {self.merge_restore!r}")
        layers = list(self.persona_layers())
        records: list = []
        workspace: dict = {}  # scratch buffers shared by all layers
        try:
            for layer in layers:
                records.append(layer.merge_(row, workspace, self.merge_restore))
        except BaseException:  # e.g. out of memory halfway: leave no layer merged
            for layer, record in zip(layers, records):
                layer.unmerge_(row, record, workspace)
            raise
        self._merge_records, self._merged_layers, self._merge_row = records, layers, row
        self._swap([layer.base for layer in layers])
        self.state.merged = True

    @torch.no_grad()
    def _unmerge(self) -> None:
        if self._merge_records is None:
            return
        row = self._merge_row
        layers, records = self._merged_layers, self._merge_records
        self._swap(layers)
        self._merge_records = self._merged_layers = self._merge_row = None
        self.state.merged = False
        workspace: dict = {}
        for layer, record in zip(layers, records):
            layer.unmerge_(row, record, workspace)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the experts: what checkpoints and exports hold."""
        return {k: v for k, v in self.state_dict().items() if ".lora_A" in k or ".lora_B" in k}

    # ------------------------------------------------------------------ PEFT interchange

    def export_peft(self, expert: str, folder: str | Path, base_model_name: str = "", revision: str | None = None) -> Path:
        """Write one expert as a standard PEFT LoRA adapter folder (PeftModel.from_pretrained loads it;
        with `base_model_name` set, AutoPeftModelForCausalLM and vLLM find the base too: see loadable_name)."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        from datamodules.io import atomic_write_bytes
        from lightning_modules.components.base_model import loadable_name

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
            base_model_name_or_path=loadable_name(base_model_name) if base_model_name else None, revision=revision,
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
