"""The persona layer is exactly the math in DESIGN §1 and interchangeable with PEFT adapters."""
from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.components.persona_lora import PersonaLoRALinear, PersonaLoRAModel

POLES = ["a_high", "a_low", "b_high", "b_low"]


def _randomise(model: PersonaLoRAModel, seed: int = 0) -> None:
    """Non-zero B so experts actually change the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.persona_layers():
        layer.lora_B.data.normal_(0, 0.05, generator=g)


@pytest.fixture()
def persona(tiny_model):
    base, tok = tiny_model
    reference = copy.deepcopy(base)
    model = PersonaLoRAModel(base, POLES, r=4, alpha=8, dropout=0.0)
    _randomise(model)
    ids = tok(["Hello there, how are you?", "Tell me a story about a cat."], return_tensors="pt", padding=True)
    return model, reference, ids


def _logits(model, ids, gates=None):
    with torch.no_grad():
        if gates is None:
            return model(**ids).logits
        return model(**ids, gates=gates).logits


def test_zero_gates_equal_base(persona):
    model, reference, ids = persona
    zero = torch.zeros(2, len(POLES))
    assert torch.equal(_logits(model, ids, zero), _logits(reference, ids))


def test_one_hot_gate_equals_exported_peft_adapter(persona, tmp_path):
    from peft import PeftModel

    model, reference, ids = persona
    for e, pole in enumerate(POLES):
        folder = model.export_peft(pole, tmp_path / pole)
        assert (folder / "adapter_config.json").is_file()
        peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), folder)
        gates = torch.nn.functional.one_hot(torch.tensor([e, e]), len(POLES)).float()
        torch.testing.assert_close(_logits(model, ids, gates), _logits(peft_model, ids), atol=1e-5, rtol=1e-4)


def test_mixed_gates_are_weighted_sum_of_deltas(persona):
    model, reference, ids = persona
    base_out = _logits(reference, ids)
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2], [0.0, 1.0, 0.5, 0.0]])
    # The delta is linear in the gates at each layer only to first order; compare on one layer directly.
    layer = next(model.persona_layers())
    x = torch.randn(2, 5, layer.base.in_features)
    with model.holding(gates):
        mixed = layer(x) - layer.base(x)
    expected = torch.zeros_like(mixed)
    for e in range(len(POLES)):
        delta_e = x @ layer.lora_A[e].t() @ layer.lora_B[e].t() * layer.scaling
        expected += gates[:, e, None, None] * delta_e
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(model, ids, gates), base_out)


def test_gathered_one_hot_path_equals_fused_path(persona):
    model, _, ids = persona
    onehot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    gathered = _logits(model, ids, onehot)
    assert model.state.sparse_index is None and model.state.gates is None  # held for the call only
    nearly = onehot + 1e-30  # every gate non-zero forces the fused path; the tiny gates change nothing visible
    torch.testing.assert_close(gathered, _logits(model, ids, nearly), atol=1e-5, rtol=1e-4)


def _only_path(monkeypatch, path: str) -> None:
    """Force one path: the sparse cost rule then always (or never) gathers."""
    from lightning_modules.components import persona_lora

    monkeypatch.setattr(persona_lora, "SPARSE_GATHER_COST", -10**6 if path == "sparse" else 10**9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_sparse_path_equals_dense_path(monkeypatch, dtype, tokens):
    from lightning_modules.components.persona_lora import GateState

    torch.manual_seed(0)
    state = GateState()
    layer = PersonaLoRALinear(torch.nn.Linear(24, 40).to(dtype), num_experts=6, r=4, alpha=8, dropout=0.0, state=state)
    layer.lora_B.data.normal_(0, 0.1)
    x = torch.randn(3, tokens, 24, dtype=dtype)
    gates = torch.tensor([[0.0, 0.7, 0.0, 0.2, 0.0, 0.0],  # rows with 2, 3 and 1 active experts: k = 3 < E
                          [0.5, 0.0, 0.3, 0.0, 0.0, 0.9],
                          [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=dtype)
    outputs = {}
    for path in ("sparse", "dense"):
        _only_path(monkeypatch, path)
        state.set(gates)
        assert state.use_sparse(tokens) == (path == "sparse")
        with torch.no_grad():
            outputs[path] = layer(x)
    # The two paths sum in another order: they agree to the dtype's rounding at the output's scale.
    scale = float(outputs["dense"].abs().max())
    torch.testing.assert_close(outputs["sparse"], outputs["dense"], rtol=0, atol=2 * torch.finfo(dtype).eps * scale)


def test_sparse_cost_rule_gathers_long_rows_and_decodes_fused():
    from lightning_modules.components.persona_lora import GateState

    state = GateState()
    state.set(torch.tensor([[0.5, 0.2, 0.1] + [0.0] * 7]))  # top-3 of 10
    assert not state.use_sparse(1) and state.use_sparse(128)
    state.set(torch.tensor([[0.0, 1.0] + [0.0] * 8]))  # one expert: always gathered
    assert state.use_sparse(1)
    state.set(torch.full((1, 10), 0.1))  # every expert active: nothing to skip
    assert not state.use_sparse(128)


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
def test_sparse_generation_with_kv_cache_matches_dense(persona, tiny_model, monkeypatch, path):
    """Greedy tokens under top-2-of-4 gates agree whichever path prefill and decoding take."""
    from lightning_modules.components.personafuse import generate_with_gates

    model, _, _ = persona
    tok = tiny_model[1]
    convs = [[{"role": "user", "content": "Tell me about your weekend plans in some detail."}],
             [{"role": "user", "content": "Hi"}]]
    gates = torch.tensor([[0.0, 0.9, 0.4, 0.0], [0.6, 0.0, 0.0, 0.8]])
    _only_path(monkeypatch, "dense")
    dense = generate_with_gates(model, tok, convs, gates, max_new_tokens=10)
    if path != "auto":
        _only_path(monkeypatch, path)
    else:
        monkeypatch.undo()
    assert generate_with_gates(model, tok, convs, gates, max_new_tokens=10) == dense


def test_export_roundtrip_and_mismatch_errors(persona, tmp_path, tiny_model_path):
    model, reference, ids = persona
    folder = model.export_peft("b_low", tmp_path / "b_low")
    other = PersonaLoRAModel(copy.deepcopy(reference), POLES, r=4, alpha=8, dropout=0.0)
    other.load_peft("b_low", folder)
    gates = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)
    torch.testing.assert_close(_logits(model, ids, gates), _logits(other, ids, gates))
    wrong_rank = PersonaLoRAModel(copy.deepcopy(reference), POLES, r=8, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="r/alpha"):
        wrong_rank.load_peft("b_low", folder)


def test_only_experts_are_trainable(persona):
    model, _, _ = persona
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert set(model.trainable_state_dict()) == trainable


def test_bf16_forward_runs(tiny_model):
    base, tok = tiny_model
    model = PersonaLoRAModel(base.to(torch.bfloat16), POLES, r=4, alpha=8, dropout=0.0)
    _randomise(model)
    ids = tok(["hi"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, gates=torch.tensor([[0.5, 0.5, 0.0, 0.0]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------- merged gates


def _base_weights(model: PersonaLoRAModel) -> dict[str, torch.Tensor]:
    return {name: layer.base.weight.detach().clone() for name, layer in zip(model.layer_names, model.persona_layers())}


@pytest.mark.parametrize("gates", [[[0.3, 0.0, 0.7, 0.2]], [[0.0, 1.0, 0.0, 0.0]], [[0.5, 0.5, 0.5, 0.5]] * 2])
def test_merged_gates_match_unmerged_and_restore_base_bit_exactly(persona, gates):
    model, _, ids = persona
    model.eval()
    gates = torch.tensor(gates)
    rows = ids["input_ids"].shape[0]
    if gates.shape[0] != rows:
        ids = {k: v[: gates.shape[0]] for k, v in ids.items()}
    before = _base_weights(model)
    unmerged = _logits(model, ids, gates)
    with torch.no_grad(), model.merged(gates):
        assert model.state.merged
        # the target paths hold the merged plain linears: a forward is exactly the base model's
        assert not any(isinstance(m, PersonaLoRALinear) for m in model.base_model.modules())
        # restored by subtraction plus the few elements whose sum rounded (kept aside), not by a copy
        assert sum(record.copied for record in model._merge_records) == 0
        assert sum(record.kept for record in model._merge_records) > 0
        merged = model(**ids, gates=gates).logits
        assert any(not torch.equal(before[n], layer.base.weight) for n, layer in zip(model.layer_names, model.persona_layers()))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert not model.state.merged and model.state.gates is None
    assert all(isinstance(model.base_model.get_submodule(n), PersonaLoRALinear) for n in model.layer_names)
    for name, layer in zip(model.layer_names, model.persona_layers()):
        assert torch.equal(layer.base.weight, before[name]), name  # bit for bit


def test_merge_restores_exactly_when_deltas_swamp_the_weights(persona):
    """Large experts make most sums round: the per-layer copy fallback still restores bit for bit."""
    model, _, ids = persona
    model.eval()
    for layer in model.persona_layers():
        layer.lora_B.data.mul_(1000.0)
    before = _base_weights(model)
    gates = torch.tensor([[0.9, 0.1, 0.0, 0.3]])
    one = {k: v[:1] for k, v in ids.items()}
    unmerged = _logits(model, one, gates)
    with torch.no_grad(), model.merged(gates):
        assert sum(record.copied for record in model._merge_records) > 0
        merged = model(**one, gates=gates).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-3, rtol=1e-3)
    for name, layer in zip(model.layer_names, model.persona_layers()):
        assert torch.equal(layer.base.weight, before[name]), name


def test_merged_generation_equals_unmerged_generation(persona):
    model, _, ids = persona
    model.eval()
    one = {k: v[:1] for k, v in ids.items()}
    gates = torch.tensor([[0.8, 0.0, 0.4, 1.0]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**one, **kwargs, gates=gates)
    with torch.no_grad(), model.merged(gates):
        merged = model.generate(**one, **kwargs, gates=gates)
    assert torch.equal(plain, merged)


def test_other_gates_inside_a_merged_block_do_not_see_the_merged_weights(persona):
    """The router reads the base model (no gates); inside a merged block a call's result still
    depends only on its own gates: the experts come out for it and go back in after."""
    model, reference, ids = persona
    model.eval()
    before = _base_weights(model)
    gates = torch.tensor([[0.2, 0.6, 0.0, 0.4]] * 2)
    other = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2)
    with torch.no_grad():
        expected_other = _logits(model, ids, other)
    with torch.no_grad(), model.merged(gates):
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits)
        assert model.state.merged  # merged again for the rest of the block
        torch.testing.assert_close(model(**ids, gates=other).logits, expected_other)
        assert model.state.merged
        merged = model(**ids, gates=gates).logits
    torch.testing.assert_close(merged, _logits(model, ids, gates), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(layer.base.weight, before[n]) for n, layer in zip(model.layer_names, model.persona_layers()))


def test_merge_refuses_what_it_cannot_do_exactly_and_auto_falls_back(persona):
    model, _, ids = persona
    model.eval()
    different = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="different gates"), torch.no_grad(), model.merged(different):
        pass
    with pytest.raises(ValueError, match="gradients"), model.merged(different[:1]):
        pass
    with torch.no_grad(), model.merged(different, strict=False) as done:
        assert not done and not model.state.merged
        torch.testing.assert_close(model(**ids, gates=different).logits, _logits(model, ids, different))
    assert model.state.gates is None and model._merge_records is None


def test_decode_sized_fused_path_equals_the_long_input_path(persona):
    """Few tokens use a per-expert bmm on B's own layout; many tokens the [out, E·r] matmul: same numbers."""
    model, _, _ = persona
    layer = next(model.persona_layers())
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2], [0.0, 1.0, 0.5, 0.1]])
    short = torch.randn(2, 1, layer.base.in_features)
    long = torch.randn(2, 200, layer.base.in_features)
    for x in (short, long):
        expected = layer.base(x)
        for e in range(len(POLES)):
            expected = expected + gates[:, e, None, None] * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t()) * layer.scaling
        with model.holding(gates):
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


def test_adapter_with_missing_tensor_or_other_base_is_refused(persona, tmp_path):
    from safetensors.torch import load_file, save_file

    model, reference, _ = persona
    folder = model.export_peft("a_high", tmp_path / "a_high")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    dropped = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor"):
        model.load_peft("a_high", folder)
    wrong_shape = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in tensors.items()}
    save_file(wrong_shape, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="has shape"):
        model.load_peft("a_high", folder)


def test_generate_with_gates_merges_when_the_batch_shares_one_gate_vector(persona, tiny_model, monkeypatch):
    from lightning_modules.components import persona_lora
    from lightning_modules.components.personafuse import generate_with_gates

    model, _, _ = persona
    model.eval()
    tok = tiny_model[1]
    convs = [[{"role": "user", "content": "My dog died this morning."}],
             [{"role": "user", "content": "Any tips for a first marathon?"}]]
    shared = torch.tensor([[0.9, 0.0, 0.3, 0.6]] * 2)
    merges = []
    original = PersonaLoRAModel._merge
    monkeypatch.setattr(PersonaLoRAModel, "_merge", lambda self, row: (merges.append(1), original(self, row))[1])
    monkeypatch.setattr(persona_lora, "MERGE_PAYS_FROM_TOKENS", 4)
    merged = generate_with_gates(model, tok, convs, shared, max_new_tokens=6)
    assert len(merges) == 1
    generate_with_gates(model, tok, convs, torch.tensor([[0.9, 0.0, 0.3, 0.6], [0.0, 1.0, 0.0, 0.0]]), max_new_tokens=6)
    assert len(merges) == 1  # different gates per row: the fused path
    monkeypatch.setattr(persona_lora, "MERGE_PAYS_FROM_TOKENS", 10**9)
    assert generate_with_gates(model, tok, convs, shared, max_new_tokens=6) == merged
    assert len(merges) == 1 and model._merge_records is None


def test_merge_in_many_row_blocks_restores_bit_exactly(persona, monkeypatch):
    """Real layers merge in ~1 MB blocks of rows; force several blocks per tiny layer, with mixed sparse/copy blocks."""
    from lightning_modules.components import persona_lora

    monkeypatch.setattr(persona_lora, "_MERGE_BLOCK_ELEMENTS", 1000)
    model, _, ids = persona
    model.eval()
    layer = next(model.persona_layers())
    layer.lora_B.data[:, :20].mul_(1000.0)  # the first rows of one layer swamp their weights: copied blocks there
    before = _base_weights(model)
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2]] * 2)
    unmerged = _logits(model, ids, gates)
    with torch.no_grad(), model.merged(gates):
        assert len(model._merge_records[0].blocks) > 1
        assert model._merge_records[0].copied > 0 and model._merge_records[0].kept > 0
        # every way of restoring a block is exercised: copy, 1-byte ulp differences, kept values
        assert {blk[2] for rec in model._merge_records for blk in rec.blocks} == {"copy", "ulp8", "sparse"}
        merged = model(**ids, gates=gates).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    for name, layer in zip(model.layer_names, model.persona_layers()):
        assert torch.equal(layer.base.weight, before[name]), name


def test_bf16_merge_restores_bit_exactly(tiny_model):
    base, tok = tiny_model
    model = PersonaLoRAModel(base.to(torch.bfloat16), POLES, r=4, alpha=8, dropout=0.0).eval()
    _randomise(model)
    before = _base_weights(model)
    ids = tok(["Hello there, how are you?"], return_tensors="pt")
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2]], dtype=torch.bfloat16)
    unmerged = _logits(model, ids, gates).float()
    with torch.no_grad(), model.merged(gates):
        merged = model(**ids, gates=gates).logits.float()
    torch.testing.assert_close(merged, unmerged, atol=0.1, rtol=0.05)  # bf16: one rounding of W + ΔW vs of each product
    assert all(torch.equal(layer.base.weight, before[n]) for n, layer in zip(model.layer_names, model.persona_layers()))


@pytest.mark.parametrize("tokens", [1, 200])
def test_fused_path_gradients_reach_gates_and_experts(persona, tokens):
    """The joint stage trains router gates and experts through the fused path (both its branches)."""
    model, _, _ = persona
    layer = next(model.persona_layers())
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2], [0.0, 1.0, 0.5, 0.1]], requires_grad=True)
    x = torch.randn(2, tokens, layer.base.in_features)
    with model.holding(gates):
        layer(x).square().sum().backward()
    got = (gates.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    gates.grad = layer.lora_A.grad = layer.lora_B.grad = None
    expected = layer.base(x)
    for e in range(len(POLES)):
        expected = expected + gates[:, e, None, None] * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t()) * layer.scaling
    expected.square().sum().backward()
    for a, b in zip(got, (gates.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_copy_restore_merges_the_same_and_restores_bit_exactly(persona):
    model, _, ids = persona
    model.eval()
    model.merge_restore = "copy"
    before = _base_weights(model)
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2]] * 2)
    unmerged = _logits(model, ids, gates)
    with torch.no_grad(), model.merged(gates):
        assert all(record.kept == 0 and record.copied > 0 for record in model._merge_records)
        merged = model(**ids, gates=gates).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(layer.base.weight, before[n]) for n, layer in zip(model.layer_names, model.persona_layers()))


def test_merge_under_inference_mode_with_experts_loaded_there(tiny_model):
    """The evaluate stage loads experts inside Lightning's predict loop (torch.inference_mode), so
    they are inference tensors without version counters; merging must still work and restore."""
    base, tok = tiny_model
    ids = tok(["hello there", "hi"], return_tensors="pt", padding=True)
    gates = torch.tensor([[0.3, 0.0, 0.7, 0.2]])
    with torch.inference_mode():
        model = PersonaLoRAModel(base, POLES, r=4, alpha=8, dropout=0.0)
        _randomise(model)
        model.eval()
        before = _base_weights(model)
        unmerged = model(**ids, gates=gates.expand(2, -1)).logits
        with model.merged(gates):
            assert model.state.merged
            merged = model(**ids, gates=gates.expand(2, -1)).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    for name, layer in zip(model.layer_names, model.persona_layers()):
        assert torch.equal(layer.base.weight, before[name]), name


def test_exported_adapter_names_a_base_that_loads_anywhere(persona, tmp_path, tiny_model_path):
    """Our alias `tiny-random-llama` means nothing to PEFT or vLLM: the adapter names the converted
    folder, and AutoPeftModelForCausalLM loads base and adapter from the adapter folder alone."""
    import json

    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    model, _, ids = persona
    folder = model.export_peft("b_high", tmp_path / "b_high", "tiny-random-llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_path
    gates = torch.nn.functional.one_hot(torch.tensor([2, 2]), len(POLES)).float()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    torch.testing.assert_close(_logits(auto, ids), _logits(model, ids, gates), atol=1e-5, rtol=1e-4)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), folder)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids, gates), atol=1e-5, rtol=1e-4)


def test_exported_adapter_keeps_a_hub_id_and_its_revision(persona, tmp_path, monkeypatch):
    import json

    model, _, _ = persona
    folder = model.export_peft("a_low", tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", revision="12fd25f")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a relative local folder is written absolute: the loader may start elsewhere
    folder = model.export_peft("a_low", tmp_path / "local", "models/mine")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "models" / "mine")
