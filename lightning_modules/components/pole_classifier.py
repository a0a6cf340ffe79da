"""Which persona pole wrote this reply? A linear probe on frozen all-MiniLM-L6-v2 embeddings.

The instrument of the `persona_expression` benchmark and of the curated corpus's separability check
(`benchmarks/persona_corpus.py`). It is trained on train-split curated replies only. Fitting uses
scikit-learn's multinomial logistic regression (its regularisation strength is chosen by 5-fold
cross-validation on the training replies, folds grouped by situation, never on the replies it is
scored on); the fitted weights
live in a plain `nn.Linear`, saved as safetensors, so scoring needs no pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class PoleClassifier(nn.Module):
    """Standardised sentence embedding -> linear -> softmax over the persona set's poles.

    `centered`: the embedding is first taken relative to its situation's centroid (the mean embedding
    of that situation's curated replies). A mean-pooled MiniLM embedding is dominated by the
    situation's topic, which every reply to it shares; the centroid removes the topic and leaves the
    pole (val ten-way 0.61 plain, about 0.8 centered on the curated corpus)."""

    def __init__(self, poles: Sequence[str], dim: int = 384, centered: bool = False) -> None:
        super().__init__()
        self.poles = list(poles)
        self.centered = centered
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.linear = nn.Linear(dim, len(self.poles))

    def forward(self, embeddings: torch.Tensor, centroids: torch.Tensor | None = None) -> torch.Tensor:
        """Pole probabilities, one row per embedding (centroids: one row per embedding when centered)."""
        if self.centered:
            if centroids is None:
                raise ValueError("a centered pole classifier needs each text's situation centroid")
            embeddings = embeddings - centroids
        return torch.softmax(self.linear((embeddings.float() - self.mean) / self.scale), dim=-1)

    def fit(self, embeddings: torch.Tensor, targets: Sequence[int], groups: Sequence[str] | None = None, seed: int = 0) -> float:
        """Fit on labelled embeddings; returns the regularisation strength C that cross-validation chose.

        C is chosen by 5-fold cross-validation on the training replies, folds grouped by situation when
        `groups` is given (the replies it will score come from unseen situations), then one
        LogisticRegression is refitted on all of them. (scikit-learn's LogisticRegressionCV refit gave
        a different model at the same C, 0.60 against 0.64 val accuracy on the curated corpus.)"""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold

        x = embeddings.double()
        if self.centered:
            x = x - situation_centroids(x, groups).double()
        self.mean.copy_(x.mean(0).float())
        self.scale.copy_((x.std(0) + 1e-6).float())
        xs = ((x - self.mean.double()) / self.scale.double()).numpy()
        folds = GroupKFold(5) if groups is not None else StratifiedKFold(5, shuffle=True, random_state=seed)
        search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": list(_CS)}, cv=folds)
        model = search.fit(xs, list(targets), groups=list(groups) if groups is not None else None).best_estimator_
        order = [list(model.classes_).index(i) for i in range(len(self.poles))]
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(model.coef_[order], dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor(model.intercept_[order], dtype=torch.float32))
        return float(model.C)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from datamodules.io import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "pole_classifier.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(folder / "pole_classifier.safetensors")
        atomic_write_text(folder / "pole_classifier.json",
                          json.dumps({"poles": self.poles, "dim": self.mean.numel(), "centered": self.centered}))

    @classmethod
    def load(cls, folder: Path) -> "PoleClassifier":
        from safetensors.torch import load_file

        meta = json.loads((Path(folder) / "pole_classifier.json").read_text())
        clf = cls(meta["poles"], meta["dim"], meta.get("centered", False))
        clf.load_state_dict(load_file(str(Path(folder) / "pole_classifier.safetensors")))
        return clf.eval()


def situation_centroids(embeddings: torch.Tensor, groups: Sequence[str] | None) -> torch.Tensor:
    """Each row's group mean (the centroid of its situation's replies), row by row."""
    if groups is None:
        raise ValueError("a centered pole classifier is fitted with each reply's situation id (groups)")
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    out = torch.empty_like(embeddings)
    for rows in index.values():
        out[rows] = embeddings[rows].mean(0)
    return out


def embed_replies(encoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings of many texts, in chunks (a `SentenceEncoder` from components.router)."""
    parts = [encoder.encode_texts(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, encoder.dim)


def opposite_poles(poles: Sequence[str], traits: Sequence[str]) -> dict[int, int]:
    """Pole index -> the index of the other pole of its trait (traits with exactly two poles)."""
    by_trait: dict[str, list[int]] = {}
    for i, trait in enumerate(traits):
        by_trait.setdefault(trait, []).append(i)
    return {i: j for pair in by_trait.values() if len(pair) == 2 for i, j in (pair, pair[::-1])}


def accuracies(probs: torch.Tensor, targets: Sequence[int], opposite: dict[int, int]) -> dict[str, float]:
    """Ten-way accuracy, and high-vs-low accuracy (own pole vs its opposite) averaged over traits."""
    t = torch.tensor(list(targets))
    ten_way = (probs.argmax(-1) == t).float().mean().item() if len(t) else float("nan")
    per_pair: dict[tuple[int, int], list[float]] = {}
    for row, target in zip(probs, t.tolist()):
        if target in opposite:
            other = opposite[target]
            per_pair.setdefault(tuple(sorted((target, other))), []).append(float(row[target] > row[other]))
    trait = sum(sum(v) / len(v) for v in per_pair.values()) / len(per_pair) if per_pair else float("nan")
    return {"ten_way": ten_way, "trait": trait}


def split_replies(replies: dict, split_of: dict[str, str], poles: Sequence[str], split: str) -> tuple[list[str], list[int], list[str]]:
    """(reply texts, pole indices, situation ids) of every curated situation in `split`, in id order."""
    texts, targets, groups = [], [], []
    for sid in sorted(replies):
        if split_of.get(sid) == split:
            for i, pole in enumerate(poles):
                texts.append(replies[sid].responses[pole])
                targets.append(i)
                groups.append(sid)
    return texts, targets, groups


def train_pole_classifier(replies: dict, split_of: dict[str, str], poles: Sequence[str], traits: Sequence[str],
                          encoder=None, seed: int = 0, centered: bool = False) -> tuple[PoleClassifier, object, dict[str, float]]:
    """(classifier fitted on train-split replies, its encoder, val scores); the test split is never read.

    Scores: `val_accuracy` (ten-way) and `val_trait_accuracy` (own pole vs its opposite, mean over
    traits). Centered, a val reply is taken relative to its situation's centroid of curated replies,
    as a system's reply is at evaluation (relative to the centroid of its situation's references)."""
    if encoder is None:
        from lightning_modules.components.router import SentenceEncoder, minilm_path

        encoder = SentenceEncoder(minilm_path())
    train_x, train_y, train_groups = split_replies(replies, split_of, poles, "train")
    val_x, val_y, val_groups = split_replies(replies, split_of, poles, "val")
    if not train_x or not val_x:
        raise ValueError(f"the pole classifier needs curated replies in the train and val splits "
                         f"(found {len(train_x)} and {len(val_x)})")
    clf = PoleClassifier(poles, encoder.dim, centered)
    c = clf.fit(embed_replies(encoder, train_x), train_y, train_groups, seed)
    val = embed_replies(encoder, val_x)
    with torch.no_grad():
        probs = clf(val, situation_centroids(val, val_groups) if centered else None)
    acc = accuracies(probs, val_y, opposite_poles(poles, traits))
    scores = {"val_accuracy": acc["ten_way"], "val_trait_accuracy": acc["trait"], "C": c,
              "train_replies": float(len(train_x)), "val_replies": float(len(val_x))}
    return clf, encoder, scores


def classify_texts(clf: PoleClassifier, encoder, texts: Sequence[str],
                   references: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
    """Pole probabilities for each text; a centered classifier needs each text's situation references."""
    centroids = None
    if clf.centered:
        if references is None or len(references) != len(texts):
            raise ValueError("a centered pole classifier needs the references of each text's situation")
        centroids = torch.stack([embed_replies(encoder, list(refs)).mean(0) for refs in references])
    with torch.no_grad():
        return clf(embed_replies(encoder, list(texts)), centroids).tolist()
