"""Route once, hold the gates, use the KV cache: same tokens as recomputing everything; save/load round-trips."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.components.persona_lora import PersonaLoRAModel
from lightning_modules.components.personafuse import PersonaFuse, generate_with_gates
from lightning_modules.components.router import GateSettings, Router, normalise_gates

POLES = ["a_high", "a_low", "b_high", "b_low"]
CONVS = [[{"role": "user", "content": "My dog died this morning."}],
         [{"role": "user", "content": "Give me a packing checklist for a week of hiking in the Alps, please."}]]


def _fuse(tiny_model) -> PersonaFuse:
    base, tok = tiny_model
    torch.manual_seed(0)
    model = PersonaLoRAModel(base, POLES, r=4, alpha=8, dropout=0.0)
    for layer in model.persona_layers():
        layer.lora_B.data.normal_(0, 0.2)
    router = Router(base.config.hidden_size, len(POLES), hidden=16, dropout=0.0, gate=GateSettings("sigmoid", 1.0, 2)).eval()
    meta = {"encoder": "base_hidden", "layer": -1, "expert_names": POLES}
    return PersonaFuse(model, tok, router, meta)


def _reference_greedy(model, tok, conv, gates, steps):
    """No cache, no batching: the full forward pass over the whole sequence at every step."""
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, use_cache=False, gates=gates[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
    return ids


def test_route_once_generation_equals_full_recompute(tiny_model):
    fuse = _fuse(tiny_model)
    model, tok = fuse.persona_model, fuse.tokenizer
    gates = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.8, 0.0, 1.0]])  # different gates per sequence
    texts = generate_with_gates(model, tok, CONVS, gates, max_new_tokens=12)
    for conv, g, text in zip(CONVS, gates, texts):
        ref_ids = _reference_greedy(model, tok, conv, g, 12)
        prompt_len = len(tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
        assert text == tok.decode(ref_ids[0, prompt_len:], skip_special_tokens=True).strip()


def test_route_gives_one_gate_vector_per_conversation(tiny_model):
    fuse = _fuse(tiny_model)
    gates = fuse.route(CONVS)
    assert gates.shape == (2, len(POLES)) and ((gates >= 0) & (gates <= 1)).all()


def test_save_and_load_give_identical_gates_and_outputs(tiny_model, tmp_path):
    fuse = _fuse(tiny_model)
    texts, gates = fuse.generate(CONVS, max_new_tokens=10)
    lora = {"r": 4, "alpha": 8, "target_modules": fuse.persona_model.target_modules}
    folder = fuse.save(tmp_path / "pf", "tiny-random-llama", lora)
    loaded = PersonaFuse.load(folder)
    texts2, gates2 = loaded.generate(CONVS, max_new_tokens=10)
    assert torch.equal(gates, gates2) and texts == texts2
    assert (folder / "adapters" / "a_high" / "adapter_config.json").is_file()


def test_gate_normalisations():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    assert torch.allclose(normalise_gates(logits, "softmax", 1.0, 3).sum(), torch.tensor(1.0))
    top = normalise_gates(logits, "topk", 1.0, top_k=2)
    assert (top > 0).sum() == 2 and torch.allclose(top.sum(), torch.tensor(1.0))
    assert torch.equal(normalise_gates(logits, "sigmoid", 1.0, 3), torch.sigmoid(logits))
    with pytest.raises(ValueError, match="did you mean 'softmax'"):
        normalise_gates(logits, "softmx", 1.0, 3)


def _naive_option_logprob(model, tok, conv, option, gates):
    """Prompt + option in one full forward pass, no cache sharing."""
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    o = tok(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + o])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, gates=gates).logits[0].float(), dim=-1)
    return float(sum(logp[len(p) + t - 1, o[t]] for t in range(len(o))))


def test_shared_prefix_option_scoring_equals_full_forward(tiny_model):
    from lightning_modules.components.personafuse import option_logprobs_rows

    fuse = _fuse(tiny_model)
    model, tok = fuse.persona_model, fuse.tokenizer
    options = [["A", "B", "C"], ["(A) Very Accurate", "(E) Very Inaccurate", "maybe"]]
    gates = torch.tensor([[0.5, 0.0, 1.0, 0.2], [0.0, 1.0, 0.0, 0.7]])
    with torch.no_grad():
        got = option_logprobs_rows(model, tok, CONVS, options, gates)
    for conv, opts, g, row in zip(CONVS, options, gates, got):
        for opt, value in zip(opts, row):
            assert value == pytest.approx(_naive_option_logprob(model, tok, conv, opt, g[None]), abs=1e-3)


def test_option_scores_flag_exactly_the_greedy_continuation(tiny_model):
    """lm-eval's is_greedy: true for the tokens greedy decoding yields, false when any token differs."""
    from lightning_modules.components.personafuse import option_logprobs_rows, option_scores_rows

    fuse = _fuse(tiny_model)
    model, tok = fuse.persona_model, fuse.tokenizer
    gates = torch.tensor([[0.5, 0.0, 1.0, 0.2]])
    prompt_len = len(tok(tok.apply_chat_template(CONVS[0], add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"])
    greedy = _reference_greedy(model, tok, CONVS[0], gates[0], 3)[0, prompt_len:].tolist()
    other = (greedy[-1] + 1) % len(tok)
    variants = [greedy, greedy[:-1] + [other], [other] + greedy[1:]]
    options = [tok.decode(ids) for ids in variants]
    assert [tok(o, add_special_tokens=False)["input_ids"] for o in options] == variants  # texts round-trip
    with torch.no_grad():
        got = option_scores_rows(model, tok, CONVS[:1], [options], gates)[0]
        logps = option_logprobs_rows(model, tok, CONVS[:1], [options], gates)[0]
    assert [flag for _, flag in got] == [True, False, False]
    assert [score for score, _ in got] == logps
