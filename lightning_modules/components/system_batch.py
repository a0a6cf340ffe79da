"""Several evaluated systems over one loaded model, run through one benchmark together.

Every gate-only system (base, prompting, PersonaFuse, the gate ablations, each expert alone, the
SFT baseline as one more stacked expert) is the same model with its own gate vector and system
prompt. `SystemBatch` runs a benchmark's own code once per system, but the model calls of all
systems are merged: each row of a merged call carries its system's prompt and gates, so a system
added to the batch costs its tokens, not another pass over the benchmark.

How: each system's benchmark code runs in its own thread, but only one thread runs at a time
(a baton, see `Lockstep`): a thread runs until it asks the model for something, then hands the
baton on. When every system has asked (or finished), the calling thread answers all requests with
merged calls and hands the results back. So the benchmark code needs no change, everything stays
deterministic, and every torch call happens on the calling thread (inside its inference mode).
No Lightning here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from lightning_modules.components.personafuse import ChatModel, generate_with_gates, option_logprobs_rows


@dataclass
class Request:
    """One model call a system's benchmark code made: generate or option_logprobs."""

    kind: str
    conversations: Sequence[list[dict]]
    max_new_tokens: int = 0
    options: Sequence[Sequence[str]] = ()


class _Aborted(BaseException):
    """Raised inside a waiting system thread when another system failed: the thread unwinds."""


class Lockstep:
    """A cooperative scheduler: N worker functions in threads, one running at a time.

    `run(workers, answer)` calls each worker(i, ask) in its own thread; `ask(request)` parks
    worker i until every live worker has asked or finished, then `answer({i: request})` runs on
    the calling thread and returns {i: result}; each ask returns its own result. Returns each
    worker's return value. The first exception (in a worker or in `answer`) stops every worker
    and is raised here.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn: Any = "main"
        self._pending: dict[int, Any] = {}
        self._results: dict[int, Any] = {}
        self._abort = False

    def run(self, workers: Sequence[Callable[[int, Callable], Any]],
            answer: Callable[[dict[int, Any]], dict[int, Any]]) -> list[Any]:
        outcomes: dict[int, tuple[bool, Any]] = {}
        threads = [threading.Thread(target=self._work, args=(i, fn, outcomes), daemon=True, name=f"system-{i}")
                   for i, fn in enumerate(workers)]
        for thread in threads:
            thread.start()
        error: Optional[BaseException] = None
        try:
            live = list(range(len(workers)))
            while live:
                for i in live:
                    self._pass_to(i)
                live = [i for i in live if i not in outcomes]
                failed = [outcomes[i][1] for i in sorted(outcomes) if not outcomes[i][0]]
                if failed:
                    raise failed[0]
                if self._pending:
                    requests, self._pending = self._pending, {}
                    self._results = answer(requests)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the threads unwound
            error = err
            self._abort = True
            while len(outcomes) < len(workers):  # a worker interrupted mid-turn parks first, then unwinds
                for i in range(len(workers)):
                    if i not in outcomes:
                        self._pass_to(i)
        for thread in threads:
            thread.join()
        if error is not None:
            raise error
        return [outcomes[i][1] for i in range(len(workers))]

    def _pass_to(self, i: int) -> None:
        """Let worker i run until it asks or finishes."""
        with self._cond:
            self._turn = i
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == "main")

    def _wait_turn(self, i: int) -> None:
        self._cond.wait_for(lambda: self._turn == i)
        if self._abort:
            raise _Aborted()

    def _work(self, i: int, fn: Callable, outcomes: dict) -> None:
        def ask(request: Any) -> Any:
            with self._cond:
                self._pending[i] = request
                self._turn = "main"
                self._cond.notify_all()
                self._wait_turn(i)
                return self._results.pop(i)

        with self._cond:
            try:
                self._wait_turn(i)
            except _Aborted:
                outcomes[i] = (True, None)
                self._turn = "main"
                self._cond.notify_all()
                return
        try:
            outcome = (True, fn(i, ask))
        except _Aborted:
            outcome = (True, None)
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            outcome = (False, err)
        with self._cond:
            outcomes[i] = outcome
            self._turn = "main"
            self._cond.notify_all()


class _SystemView:
    """The EvalModel one system's benchmark code sees: its calls become requests to the batch."""

    def __init__(self, ask: Callable[[Request], Any]) -> None:
        self.ask = ask
        self.gate_rows: list[list[float]] = []

    def generate(self, conversations, max_new_tokens: int) -> list[str]:
        texts, gates = self.ask(Request("generate", list(conversations), max_new_tokens=max_new_tokens))
        self.gate_rows += gates
        return texts

    def option_logprobs(self, conversations, options) -> list[list[float]]:
        scores, gates = self.ask(Request("option_logprobs", list(conversations), options=list(options)))
        self.gate_rows += gates
        return scores


class SystemBatch:
    """Systems (name -> ChatModel over one shared model) evaluated on a benchmark together.

    `evaluate(benchmark)` returns, per system, what `benchmark.evaluate(system)` would: (metrics,
    records), plus the gate rows the system used. Merged calls hold at most `batch_size` rows.
    """

    def __init__(self, systems: dict[str, ChatModel], batch_size: int) -> None:
        models = {id(chat.model) for chat in systems.values()}
        if len(models) > 1:
            raise ValueError(f"systems {sorted(systems)} do not share one model; batch only systems that do")
        self.systems, self.batch_size = systems, batch_size
        first = next(iter(systems.values()))
        self.model, self.tokenizer = first.model, first.tokenizer

    def evaluate(self, benchmark) -> dict[str, tuple[dict, list[dict], list[list[float]]]]:
        names = list(self.systems)

        def worker(i: int, ask: Callable) -> tuple:
            view = _SystemView(ask)
            metrics, records = benchmark.evaluate(view, self.batch_size)
            return metrics, records, view.gate_rows

        results = Lockstep().run([worker] * len(names), lambda requests: self._answer(names, requests))
        return dict(zip(names, results))

    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> dict[str, list[str]]:
        """Every system's replies to the same conversations, in merged calls (one round, no threads)."""
        requests = {name: Request("generate", list(conversations), max_new_tokens=max_new_tokens) for name in self.systems}
        answers = self._merged("generate", requests, list(range(len(requests))))
        return {name: answers[i][0] for i, name in enumerate(requests)}

    def _answer(self, names: list[str], requests: dict[int, Request]) -> dict[int, tuple]:
        """Answer one round of requests: generation grouped by length, option scoring grouped."""
        groups: dict[tuple, list[int]] = {}
        for i, request in requests.items():
            groups.setdefault((request.kind, request.max_new_tokens), []).append(i)
        answers = {}
        for (kind, _), members in groups.items():
            answers.update(self._merged(kind, {names[i]: requests[i] for i in members}, members))
        return answers

    def _merged(self, kind: str, requests: dict[str, Request], members: list[int]) -> dict[int, tuple]:
        """One merged call over the rows of several systems; rows interleave item by item, so a
        chunk holds the same items across systems (their prompts pad alike)."""
        gates = {name: self.systems[name].route(request.conversations) if request.conversations else None
                 for name, request in requests.items()}  # (a router cannot encode an empty batch)
        rows = [(name, j) for j in range(max(len(r.conversations) for r in requests.values()))
                for name, r in requests.items() if j < len(r.conversations)]
        outputs: dict[tuple[str, int], Any] = {}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start: start + self.batch_size]
            prompted = [self.systems[n].prompted(requests[n].conversations[j]) for n, j in chunk]
            row_gates = self._stack([None if gates[n] is None else gates[n][j] for n, j in chunk])
            if kind == "generate":
                got = generate_with_gates(self.model, self.tokenizer, prompted, row_gates, requests[chunk[0][0]].max_new_tokens)
            else:
                got = option_logprobs_rows(self.model, self.tokenizer, prompted,
                                           [requests[n].options[j] for n, j in chunk], row_gates)
            outputs.update(zip(chunk, got))
        return {i: ([outputs[(name, j)] for j in range(len(requests[name].conversations))],
                    [] if gates[name] is None else gates[name].tolist())
                for i, name in zip(members, requests)}

    def _stack(self, rows: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """Per-row gates of one chunk; a system without gates contributes zeros (exactly the base
        model), and a chunk where no row has gates passes None (the model may have no experts)."""
        present = [r for r in rows if r is not None]
        if not present:
            return None
        zero = torch.zeros_like(present[0])
        return torch.stack([zero if r is None else r for r in rows])
