"""Slide-level heads on bags of frozen tile embeddings: ABMIL and a mean-pooling baseline.

A slide is a *bag* of ``N`` tile embeddings ``(N, D)`` (``scratchpath embed``'s files) with one
label. Both heads share eva's ABMIL layout (kaiko-ai/eva ``vision/models/networks/abmil.py``,
its Camelyon16 / PANDA protocol): an input projection (``Linear(D, 128)`` + dropout), a pooling
of the projected tiles to one vector, and an MLP head (``128 -> 128 -> 64 -> classes``, ReLU).
They differ only in the pooling:

- :class:`ABMIL`: gated attention (Ilse, Tomczak & Welling, *Attention-based Deep Multiple
  Instance Learning*, ICML 2018): ``a_i = w · (tanh(V h_i) ⊙ sigmoid(U h_i))``, softmax over the
  bag's tiles, attention-weighted sum. The weights say which tiles decided (heatmaps);
- :class:`MeanPool`: the plain mean of the bag's tiles, the baseline a slide-level result must
  beat (a small tumour focus is diluted in it).

Training (:func:`train_head`) follows eva's recipe: AdamW (lr 1e-3), mini-batches of bags
padded to ``max_tiles`` (a fresh random subset of a larger bag every epoch, seeded), the best
epoch on a validation split by balanced accuracy, early stopping. Evaluation uses every tile.
Memory: bags are read from memory-mapped files, so only a batch of ``max_tiles × D`` values is
in memory at a time, whatever the number of slides.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn

from scratchpath.embed import read_slide
from scratchpath.errors import ScratchpathError
from scratchpath.finetune.probes import _one_thread

HEADS = ("abmil", "mean_pool")


class _SlideHead(nn.Module):
    """Projection -> pooling (subclasses) -> MLP, on padded bags ``(B, N, D)`` + mask."""

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        *,
        projected: int = 128,
        mlp_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_features, projected), nn.Dropout(dropout))
        layers: list[nn.Module] = []
        width = projected
        for hidden in mlp_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.classifier = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` pooling weights of the projected tiles (zero on padding, sum 1)."""
        raise NotImplementedError

    def forward(self, bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, D)`` bags (``mask`` (B, N): True on real tiles) -> ``(B, C)`` logits."""
        if mask is None:
            mask = torch.ones(bags.shape[:2], dtype=torch.bool, device=bags.device)
        h = self.projector(bags)  # (B, N, P)
        pooled = (self.weights(h, mask).unsqueeze(-1) * h).sum(dim=1)  # (B, P)
        return self.classifier(pooled)

    @torch.no_grad()
    def attention(self, bag: torch.Tensor) -> torch.Tensor:
        """``(N,)`` weight of each tile of one bag ``(N, D)`` in the slide's prediction."""
        h = self.projector(bag[None])
        return self.weights(h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device))[0]


class ABMIL(_SlideHead):
    """Gated-attention MIL head (see the module docstring); ``attention_hidden`` is the width of
    the attention's two gates."""

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        *,
        projected: int = 128,
        attention_hidden: int = 128,
        mlp_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            in_features, n_classes, projected=projected, mlp_hidden=mlp_hidden, dropout=dropout
        )
        self.attention_a = nn.Sequential(nn.Linear(projected, attention_hidden), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(projected, attention_hidden), nn.Sigmoid())
        self.attention_c = nn.Linear(attention_hidden, 1)

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)  # (B, N)
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=1)


class MeanPool(_SlideHead):
    """The mean of the bag's projected tiles, then the same MLP: the baseline of ABMIL."""

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float()
        return m / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def make_head(name: str, in_features: int, n_classes: int, **kwargs) -> _SlideHead:
    """``"abmil"`` or ``"mean_pool"``."""
    heads = {"abmil": ABMIL, "mean_pool": MeanPool}
    if name not in heads:
        raise ScratchpathError(f"head: expected one of {', '.join(heads)}, got {name!r}")
    return heads[name](in_features, n_classes, **kwargs)


@dataclass
class Bag:
    """One slide: its embeddings file, label (class index) and group (patient)."""

    slide_id: str
    path: str
    label: int
    group: str
    _features: np.ndarray | None = field(default=None, repr=False)

    @property
    def features(self) -> np.ndarray:
        """``(N, D)``, memory-mapped from the file on first use."""
        if self._features is None:
            self._features = read_slide(self.path).features
        return self._features


@dataclass
class TrainConfig:
    """eva's ABMIL recipe, scaled: AdamW, lr 1e-3, bags of up to ``max_tiles`` tiles."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    max_tiles: int = 1000
    patience: int = 20
    dropout: float = 0.0


def _batch(
    bags: Sequence[Bag],
    max_tiles: int | None,
    rng: np.random.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags padded to one ``(B, N, D)`` tensor and its mask; bags over ``max_tiles`` tiles get
    a random subset (sorted rows: sequential reads of the memory map)."""
    parts = []
    for bag in bags:
        features = bag.features
        if max_tiles is not None and len(features) > max_tiles:
            rows = np.sort(rng.choice(len(features), max_tiles, replace=False))
            features = features[rows]
        parts.append(torch.from_numpy(np.array(features, np.float32)))  # a copy: maps are read-only
    n = max(len(p) for p in parts)
    x = torch.zeros(len(parts), n, parts[0].shape[1])
    mask = torch.zeros(len(parts), n, dtype=torch.bool)
    for i, p in enumerate(parts):
        x[i, : len(p)], mask[i, : len(p)] = p, True
    return x.to(device), mask.to(device)


@torch.no_grad()
def predict(head: nn.Module, bags: Sequence[Bag], device: torch.device | str = "cpu") -> np.ndarray:
    """``(len(bags), C)`` class probabilities, each bag with all its tiles."""
    head.eval()
    probs = []
    for bag in bags:
        x, mask = _batch([bag], None, None, torch.device(device))
        probs.append(head(x, mask).softmax(dim=1).cpu())
    return torch.cat(probs).numpy()


def slide_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and ROC AUC (binary: of the second class; several: one-vs-rest, macro;
    NaN when the test side lacks a class)."""
    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    try:
        if n_classes == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", labels=range(n_classes)))
    except ValueError:
        auc = float("nan")
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, probs.argmax(1))),
        "auc": auc,
    }


def _train_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Sequence[Bag],
    labels: torch.Tensor,
    config: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> None:
    head.train()
    order = rng.permutation(len(train))
    for start in range(0, len(order), config.batch_size):
        chosen = order[start : start + config.batch_size]
        x, mask = _batch([train[i] for i in chosen], config.max_tiles, rng, device)
        loss = F.cross_entropy(head(x, mask), labels[chosen].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_head(
    name: str,
    train: Sequence[Bag],
    val: Sequence[Bag],
    n_classes: int,
    *,
    config: TrainConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[_SlideHead, dict]:
    """Train head ``name`` on ``train``, keep its best epoch on ``val`` (balanced accuracy,
    then lower loss); returns the head (eval mode) and its history."""
    config = config or TrainConfig()
    device = torch.device(device)
    if not train or not val:
        raise ScratchpathError("slides: a split left no training or validation slide")
    torch.manual_seed(seed)
    head = make_head(name, train[0].features.shape[1], n_classes, dropout=config.dropout)
    head = head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(seed)
    labels = torch.tensor([b.label for b in train])
    val_labels = np.array([b.label for b in val])
    best, best_key, best_epoch, waited, history = None, (-1.0, 0.0), 0, 0, []
    # bags of a few hundred 128-d vectors: intra-op threads only contend (see probes._one_thread)
    with _one_thread() if device.type == "cpu" else contextlib.nullcontext():
        for epoch in range(config.epochs):
            _train_epoch(head, optimizer, train, labels, config, rng, device)
            probs = predict(head, val, device)
            score = slide_metrics(val_labels, probs)["balanced_accuracy"]
            val_loss = float(
                F.nll_loss(torch.from_numpy(np.log(probs + 1e-12)), torch.from_numpy(val_labels))
            )
            history.append({"epoch": epoch, "val_balanced_accuracy": score, "val_loss": val_loss})
            if (score, -val_loss) > best_key:
                best, best_key, best_epoch = (
                    copy.deepcopy(head.state_dict()),
                    (score, -val_loss),
                    epoch,
                )
                waited = 0
            else:
                waited += 1
                if waited >= config.patience:
                    break
    head.load_state_dict(best)
    return head.eval(), {"epochs_run": len(history), "best": history[best_epoch]}
