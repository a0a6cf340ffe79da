"""Gate policies of the evaluated systems, on the shipped situations corpus and a real Router."""
from __future__ import annotations

import pytest
import torch

from datamodules.personas import load_personas
from datamodules.situations import load_situations
from experiments.config import load_config
from lightning_modules.components.router import GateSettings, Router
from lightning_modules.evaluate_gates import gate_function
from lightning_modules.evaluate_systems import builtin_systems


class RoutedFromFixedEmbeddings:
    """What gate_function needs of a PersonaFuse (`route`, `router`), without a base model: each
    conversation is embedded as a fixed random vector, so the router's gates are real router output."""

    def __init__(self, router: Router):
        self.router = router

    def route(self, convs):
        pooled = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(len(str(c)))) for c in convs])
        return self.router.gates(pooled)


def _policy(system: str, gate: GateSettings):
    cfg = load_config("experiments/smoke.yaml")
    torch.manual_seed(0)
    return gate_function(builtin_systems()[system], RoutedFromFixedEmbeddings(Router(8, 10, gate=gate).eval()), cfg), cfg


def _corpus_item(cfg):
    personas = load_personas(cfg.personas.file)
    item = load_situations(cfg.data.situations, personas)[0]
    return item.conversation(), torch.tensor(personas.label_vector(item.label, item.id))


def test_oracle_gates_are_the_curated_label_under_sigmoid_gates():
    oracle, cfg = _policy("oracle_gates", GateSettings("sigmoid", 1.0, 3))
    conversation, label = _corpus_item(cfg)
    gates = oracle([conversation])
    assert torch.allclose(gates[0], label, atol=1e-4)


def test_oracle_gates_follow_the_routers_top_k_normalisation():
    oracle, cfg = _policy("oracle_gates", GateSettings("topk", 1.0, 3))
    conversation, label = _corpus_item(cfg)
    gates = oracle([conversation])[0]
    kept = gates.nonzero()[:, 0]
    assert set(kept.tolist()) == set(label.topk(3).indices.tolist())
    assert gates.sum().item() == pytest.approx(1.0)
    # the most activated pole gets the largest gate
    assert int(gates.argmax()) == int(label.argmax())


def test_oracle_falls_back_to_the_router_for_prompts_outside_the_corpus():
    oracle, cfg = _policy("oracle_gates", GateSettings("topk", 1.0, 3))
    conversation, _ = _corpus_item(cfg)
    benchmark_prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    routed, _ = _policy("personafuse", GateSettings("topk", 1.0, 3))
    gates = oracle([benchmark_prompt, conversation])
    assert torch.equal(gates[0], routed([benchmark_prompt])[0])
    assert not torch.equal(gates[1], routed([conversation])[0])


def test_uniform_gates_keep_the_routers_gate_mass():
    uniform, cfg = _policy("uniform_gates", GateSettings("sigmoid", 1.0, 3))
    routed, _ = _policy("personafuse", GateSettings("sigmoid", 1.0, 3))
    conversation, _ = _corpus_item(cfg)
    gates = uniform([conversation])[0]
    assert torch.allclose(gates, gates[:1].expand(10))
    assert gates.sum().item() == pytest.approx(routed([conversation])[0].sum().item(), rel=1e-5)
