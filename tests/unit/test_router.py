"""Router losses and the router stage's training signal, mostly without Lightning or a language model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_modules.components.router import Router, router_loss

W = SimpleNamespace(bce=1.0, contrastive=0.5, load_balance=0.1, pole_exclusivity=1.0)


def test_every_configured_term_is_reported_and_weighted():
    torch.manual_seed(0)
    router = Router(8, 4, hidden=16, dropout=0.0)
    pooled, labels = torch.randn(6, 8), torch.rand(6, 4)
    terms = router_loss(router, router(pooled), labels, pooled, W, [(0, 1), (2, 3)])
    assert set(terms) == {"loss", "bce", "contrastive", "load_balance", "pole_exclusivity"}
    expected = terms["bce"] + 0.5 * terms["contrastive"] + 0.1 * terms["load_balance"] + terms["pole_exclusivity"]
    assert torch.allclose(terms["loss"], expected)
    only_bce = router_loss(router, router(pooled), labels, pooled, SimpleNamespace(bce=1.0, contrastive=0, load_balance=0, pole_exclusivity=0))
    assert set(only_bce) == {"loss", "bce"}


def test_pole_exclusivity_penalises_both_poles_on():
    logits_both = torch.tensor([[5.0, 5.0, -5.0, -5.0]])
    logits_one = torch.tensor([[5.0, -5.0, -5.0, 5.0]])
    pairs = [(0, 1), (2, 3)]
    w = SimpleNamespace(bce=0.0, contrastive=0, load_balance=0, pole_exclusivity=1.0)
    router = Router(2, 4)
    both = router_loss(router, logits_both, torch.zeros(1, 4), torch.zeros(1, 2), w, pairs)["pole_exclusivity"]
    one = router_loss(router, logits_one, torch.zeros(1, 4), torch.zeros(1, 2), w, pairs)["pole_exclusivity"]
    assert both > 0.4 and one < 0.01


def test_router_learns_a_separable_labelling():
    """BCE training drives micro-F1 to 1 on a linearly separable toy problem: the loss has signal."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    labels = (x[:, :4] > 0).float()
    router = Router(8, 4, hidden=32, dropout=0.0)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(200):
        loss = router_loss(router, router(x), labels, x, SimpleNamespace(bce=1.0, contrastive=0, load_balance=0, pole_exclusivity=0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = torch.sigmoid(router(x)) > 0.5
    assert (pred == labels.bool()).float().mean() > 0.97


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
def test_hidden_state_at_equals_full_forward_hidden_states(tiny_model, layer):
    """The early-exit read of one layer equals output_hidden_states, for plain and persona models."""
    from lightning_modules.components.persona_lora import PersonaLoRAModel
    from lightning_modules.components.router import hidden_state_at

    model, tok = tiny_model
    batch = tok(["hello there, how are you", "hi"], return_tensors="pt", padding=True)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(hidden_state_at(model, layer, batch), want)
        persona = PersonaLoRAModel(model, ["a", "b"], r=2).eval()
        torch.testing.assert_close(hidden_state_at(persona, layer, batch), want)  # no gates: the base model


def test_router_owns_its_gate_settings_and_saves_them(tmp_path):
    """The router returns gates by the settings it was built (and saved) with; router.json keeps them."""
    from lightning_modules.components.router import GateSettings, load_router, normalise_gates, save_router

    torch.manual_seed(0)
    router = Router(8, 4, hidden=16, dropout=0.0, gate=GateSettings("topk", 0.5, 2)).eval()
    pooled = torch.randn(3, 8)
    gates = router.gates(pooled)
    assert torch.equal(gates, normalise_gates(router(pooled), "topk", 0.5, 2)) and ((gates > 0).sum(dim=1) == 2).all()
    save_router(router, tmp_path / "r", {"encoder": "base_hidden", "layer": -1})
    loaded, meta = load_router(tmp_path / "r")
    assert loaded.gate == router.gate and meta == {"encoder": "base_hidden", "layer": -1}
    assert torch.equal(loaded.gates(pooled), gates)
    with pytest.raises(ValueError, match="no gate settings"):
        Router(8, 4).gates(pooled)
