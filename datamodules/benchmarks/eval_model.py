"""The narrow interface every evaluated system exposes to the benchmarks.

Benchmarks only ever see this protocol, so a new system (prompting, PersonaFuse,
an ablation) needs no benchmark change, and scoring is testable with a scripted model.
"""
from __future__ import annotations

from typing import Protocol, Sequence

Message = dict[str, str]
Conversation = list[Message]


class EvalModel(Protocol):
    """A chat model under evaluation."""

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
        """Greedy reply to each conversation (chat template and generation prompt applied)."""
        ...

    def option_logprobs(
        self, conversations: Sequence[Conversation], options: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Summed log-probability of each option text as the assistant's reply to its conversation."""
        ...
