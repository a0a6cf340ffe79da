"""How well can a router read the situations from frozen features? (issue: router micro-F1 target)

Embeds every situation of the corpus once with the base model (mean- and last-token-pooled hidden
states of several layers) and with MiniLM, then trains small probes on the router stage's train
split: a linear layer and a 256-unit MLP on standardised features. Each probe's val and test
micro-F1 are printed (labels thresholded at 0.5, as in the router stage), with the test F1 at a
global threshold tuned on val. Run with nothing else on the machine:

    .venv/bin/python benchmarks/router_probe.py [--model smollm2-135m-instruct] [--layers 8 12 16 20 24 -1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def micro_f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    truth = labels >= 0.5
    tp = (predicted & truth).sum().item()
    wrong = (predicted & ~truth).sum().item() + (~predicted & truth).sum().item()
    return 2 * tp / max(1, 2 * tp + wrong)


@torch.no_grad()
def base_features(model_name: str, texts: list[str], layers: list[int]) -> dict[str, torch.Tensor]:
    """mean<L> and last<L> pooled hidden states of the frozen base model for each layer L."""
    from lightning_modules.components.base_model import load_base_model
    from lightning_modules.components.router import _tokenize

    model, tok = load_base_model(model_name)
    pooled: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), 16):
        batch = _tokenize(tok, texts[start : start + 16], 512, torch.device("cpu"), special_tokens=False)
        hidden = model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        last = batch["attention_mask"].sum(1) - 1  # right padding
        for layer in layers:
            h = hidden[layer].float()
            pooled.setdefault(f"mean{layer}", []).append((h * mask).sum(1) / mask.sum(1))
            pooled.setdefault(f"last{layer}", []).append(h[torch.arange(h.shape[0]), last])
    return {name: torch.cat(parts) for name, parts in pooled.items()}


def probe(x: torch.Tensor, y: torch.Tensor, train: slice, hidden: int, weight_decay: float, seed: int = 0) -> torch.Tensor:
    """Sigmoid scores for every row from a probe trained on `train` (BCE on the soft labels)."""
    torch.manual_seed(seed)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
    xn = (x - mu) / sd
    layers = [torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], hidden or y.shape[1])]
    if hidden:
        layers += [torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, y.shape[1])]
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3 if hidden else 1e-2, weight_decay=weight_decay)
    for _ in range(300):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(xn[train]), y[train]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return torch.sigmoid(net(xn))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12, 16, 20, 24, -1])
    args = parser.parse_args(argv)

    from datamodules.personas import load_personas
    from datamodules.situations import load_situations, split_situations
    from experiments.config import load_config, project_path
    from lightning_modules.components.router import SentenceEncoder, conversation_text, minilm_path
    from lightning_modules.components.base_model import load_tokenizer

    cfg = load_config(project_path("experiments/quickstart.yaml"), [f"model.name_or_path={args.model}"])
    personas = load_personas(project_path(cfg.personas.file))
    items = load_situations(project_path(cfg.data.situations), personas, cfg.data.on_bad_line)
    splits = split_situations(items, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    ordered = [s for name in ("train", "val", "test") for s in splits[name]]
    y = torch.tensor([personas.label_vector(s.label, s.id) for s in ordered])
    n_train, n_val = len(splits["train"]), len(splits["val"])
    train, val, test = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, len(ordered))

    tok = load_tokenizer(args.model)
    features = base_features(args.model, [conversation_text(tok, s.conversation()) for s in ordered], args.layers)
    minilm = SentenceEncoder(minilm_path())
    features["minilm"] = torch.cat([minilm([s.conversation() for s in ordered[i : i + 32]]) for i in range(0, len(ordered), 32)])

    rows = []
    for name, x in features.items():
        for hidden, wd in ((0, 1.0), (256, 0.1)):
            scores = probe(x, y, train, hidden, wd)
            threshold = max((micro_f1(scores[val] >= t, y[val]), t) for t in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55))[1]
            rows.append((micro_f1(scores[val] >= 0.5, y[val]), micro_f1(scores[test] >= 0.5, y[test]),
                         micro_f1(scores[test] >= threshold, y[test]), threshold, name, "mlp256" if hidden else "linear"))
    print(f"{len(ordered)} situations (train {n_train}, val {n_val}, test {len(ordered) - n_train - n_val}), model {args.model}")
    print(f"{'features':>10} {'probe':>7} {'val F1':>7} {'test F1':>8} {'test F1 @ val-tuned threshold':>30}")
    for val_f1, test_f1, tuned, threshold, name, kind in sorted(rows, reverse=True):
        print(f"{name:>10} {kind:>7} {val_f1:7.3f} {test_f1:8.3f} {tuned:12.3f} (t={threshold:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
