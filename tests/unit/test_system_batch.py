"""Systems evaluated together give what each gives alone: same replies and scores, log-likelihoods
within float tolerance; the scheduler under it is deterministic and fails loudly."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_modules.components.persona_lora import PersonaLoRAModel
from lightning_modules.components.personafuse import ChatModel
from lightning_modules.components.router import GateSettings, Router
from lightning_modules.components.system_batch import Lockstep, SystemBatch

EXPERTS = ["a_high", "a_low", "b_high", "b_low", "sft"]


def _systems(tiny_model) -> dict[str, ChatModel]:
    """Gate-only systems over one model: base, prompting, a routed mix, one expert, the stacked SFT LoRA."""
    base, tok = tiny_model
    torch.manual_seed(0)
    model = PersonaLoRAModel(base, EXPERTS, r=4, alpha=8, dropout=0.0).eval()
    for layer in model.persona_layers():
        layer.lora_B.data.normal_(0, 0.2)
    router = Router(base.config.hidden_size, 4, hidden=16, dropout=0.0, gate=GateSettings("sigmoid", 1.0, 2)).eval()
    from lightning_modules.components.router import build_encoder

    encoder = build_encoder("base_hidden", -1, model, tok)

    def routed(convs):
        with torch.no_grad():
            return torch.nn.functional.pad(router.gates(encoder(convs)), (0, 1))

    def one_hot(name):
        return lambda convs: torch.nn.functional.one_hot(torch.full((len(convs),), EXPERTS.index(name)), len(EXPERTS)).float()

    return {
        "base": ChatModel(model, tok, None, None, 3),
        "prompting": ChatModel(model, tok, None, "Be kind and brief.", 3),
        "personafuse": ChatModel(model, tok, routed, None, 3),
        "expert_a_high": ChatModel(model, tok, one_hot("a_high"), None, 3),
        "sft": ChatModel(model, tok, one_hot("sft"), None, 3),
    }


@pytest.mark.parametrize("name,limit", [("gsm8k", 4), ("mpi", 5), ("emobench_ea", 4)])
def test_batched_systems_equal_each_system_alone(tiny_model, name, limit):
    from datamodules.benchmarks import BENCHMARKS

    options = {"gsm8k": {"max_new_tokens": 6}}.get(name, {})
    benchmark = BENCHMARKS.get(name)(None, limit, 0, **options)
    systems = _systems(tiny_model)
    with torch.inference_mode():
        together = SystemBatch(systems, batch_size=3).evaluate(benchmark)
        for system, chat in systems.items():
            alone_metrics, alone_records = benchmark.evaluate(chat, 3)
            metrics, records, gates = together[system]
            assert len(records) == len(alone_records) == limit
            for got, want in zip(records, alone_records):
                for key, value in want.items():
                    if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                        assert got[key] == pytest.approx(value, abs=1e-4), (system, key)
                    else:
                        assert got[key] == value, (system, key)
            assert metrics.keys() == alone_metrics.keys()
            assert (gates == []) == (chat.gate_fn is None)


def test_lockstep_runs_workers_one_at_a_time_and_merges_rounds():
    seen_rounds, active, overlaps = [], [0], []

    def worker(i, ask):
        total = 0
        for step in range(3 - i):  # workers finish at different rounds
            active[0] += 1
            time.sleep(0.002)  # a window in which another running worker would show
            overlaps.append(active[0] > 1)
            active[0] -= 1
            total += ask((i, step))
        return total

    def answer(requests):
        seen_rounds.append(sorted(requests))
        return {i: i * 10 + step for i, (_, step) in requests.items()}

    assert Lockstep().run([worker] * 3, answer) == [0 + 1 + 2, 10 + 11, 20]
    assert seen_rounds == [[0, 1, 2], [0, 1], [0]]
    assert overlaps and not any(overlaps)


def test_lockstep_ctrl_c_while_a_worker_runs_unwinds_every_thread():
    """Ctrl-C reaches the calling thread while a worker is mid-turn: that worker parks at its next
    ask and must still be unwound, or joining it would hang."""
    import signal

    def worker(i, ask):
        if i == 0:
            # A real SIGINT, aimed at the main thread as a terminal's Ctrl-C lands there: sent with
            # os.kill from this thread, Linux may deliver it to this thread, and then the calling
            # thread's wait is not interrupted at all.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.2)
        ask(i)
        ask(i)

    # KeyboardInterrupt comes from Python's default handler, which a process that inherited SIGINT
    # ignored does not have.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Lockstep().run([worker] * 2, lambda requests: {i: None for i in requests})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not [t for t in threading.enumerate() if t.name.startswith("system-")]


@pytest.mark.parametrize("where", ["worker", "answer"])
def test_lockstep_raises_the_first_error_and_stops_every_worker(where):
    finished = []

    def worker(i, ask):
        if where == "worker" and i == 1:
            raise ValueError("benchmark code failed")
        ask(i)
        ask(i)
        finished.append(i)

    def answer(requests):
        if where == "answer":
            raise RuntimeError("model call failed")
        return {i: None for i in requests}

    with pytest.raises((ValueError, RuntimeError), match="failed"):
        Lockstep().run([worker] * 3, answer)
    assert finished == []
    assert not [t for t in threading.enumerate() if t.name.startswith("system-")]


def test_batched_replies_equal_each_system_alone(tiny_model):
    """The judge's downstream replies: every system answers the same conversations in merged calls."""
    systems = _systems(tiny_model)
    convs = [[{"role": "user", "content": "My landlord ignores the broken heating."}],
             [{"role": "user", "content": "I failed my driving test again."}]]
    with torch.inference_mode():
        together = SystemBatch(systems, batch_size=4).generate(convs, 8)
        assert together == {name: chat.generate(convs, 8) for name, chat in systems.items()}
    assert len(set(map(tuple, together.values()))) > 1  # the systems do differ
