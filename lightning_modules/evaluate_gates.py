"""Gate policies of the evaluated systems: the router, and the ablations built on it.

Every policy maps a batch of conversations to a [batch, E] gate tensor, so a new ablation is a
new `SystemSpec` plus (at most) one branch here.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from datamodules.personas import load_personas
from datamodules.situations import load_situations
from lightning_modules.evaluate_systems import SystemSpec


def gate_function(spec: SystemSpec, fuse, cfg) -> Callable[[Sequence[list[dict]]], torch.Tensor]:
    personas = load_personas(cfg.personas.file)
    kind = spec.gates

    def routed(convs):
        gates = fuse.route(convs)
        if spec.drop_trait:
            off = [i for i, p in enumerate(personas.poles) if p.trait == spec.drop_trait]
            gates = gates.clone()
            gates[:, off] = 0.0
        return gates

    if kind == "router":
        return routed
    if kind == "router_top1":
        return lambda convs: torch.nn.functional.one_hot(routed(convs).argmax(dim=1), len(personas.ids)).float()
    if kind == "uniform":
        # Same total gate mass as the router, spread evenly: removes the routing decision only.
        return lambda convs: routed(convs).sum(dim=1, keepdim=True).expand(-1, len(personas.ids)) / len(personas.ids)
    if kind == "oracle":
        return _oracle(cfg, personas, fuse.router, routed)
    raise ValueError(f"system gate policy '{kind}' is not known")


def _oracle(cfg, personas, router, fallback) -> Callable:
    """A perfect router: for a corpus conversation, the logits whose sigmoid is its curated label,
    normalised by the router's own gate settings (so top-k and softmax routers get the oracle's
    top-k / softmax, with the same total gate mass). Other prompts (benchmarks) fall back to the router."""
    items = load_situations(cfg.data.situations, personas, cfg.data.on_bad_line)
    labels = {_key(s.conversation()): personas.label_vector(s.label, s.id) for s in items}

    def oracle(convs):
        routed = fallback(convs)
        rows = [labels.get(_key(c)) for c in convs]
        known = [i for i, r in enumerate(rows) if r is not None]
        if known:
            routed = routed.clone()
            routed[known] = router.normalise(perfect_logits(torch.tensor([rows[i] for i in known]))).to(routed)
        return routed

    return oracle


def perfect_logits(labels: torch.Tensor) -> torch.Tensor:
    """Logits a router trained with BCE would output if it predicted `labels` exactly."""
    return torch.logit(labels.float().clamp(1e-4, 1 - 1e-4))


def _key(conversation: list[dict]) -> Optional[str]:
    return "\x1f".join(f"{m['role']}:{m['content']}" for m in conversation if m["role"] != "system")
