"""`personafuse chat`: talk to a trained PersonaFuse model; each turn shows the top activated poles.

The router reads the whole conversation so far, once per turn; the reply is generated under
those gates.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console()


def find_folder(source: str | Path) -> Path:
    """A PersonaFuse folder itself, or the one the router stage assembled in a pipeline output_dir."""
    source = Path(source)
    for candidate in (source, source / "router" / "personafuse"):
        if (candidate / "personafuse.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{source}: no PersonaFuse folder here (expected personafuse.json, or router/personafuse/ in a "
        "pipeline output_dir that ran adapter_sft and router)")


def top_poles(gates, names: list[str], k: int) -> str:
    ranked = sorted(zip(names, gates.tolist()), key=lambda x: -x[1])[:k]
    return ", ".join(f"{name} {value:.2f}" for name, value in ranked)


def chat_loop(source: str, max_new_tokens: int = 160, top: int = 3) -> int:
    from lightning_modules.components.personafuse import PersonaFuse

    folder = find_folder(source)
    with console.status(f"loading {folder}"):
        fuse = PersonaFuse.load(folder)
    names = fuse.persona_model.expert_names
    console.print("[bold]PersonaFuse chat[/] — empty line or Ctrl-D to quit")
    conversation: list[dict] = []
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if not text:
            break
        conversation.append({"role": "user", "content": text})
        replies, gates = fuse.generate([conversation], max_new_tokens)
        console.print(f"[dim]poles: {top_poles(gates[0], names, top)}[/]")
        console.print(f"[bold green]bot>[/] {replies[0]}")
        conversation.append({"role": "assistant", "content": replies[0]})
    return 0
