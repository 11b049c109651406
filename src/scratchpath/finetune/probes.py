"""Probe math on frozen features: feature extraction, weighted kNN, linear probe, RankMe.

These functions are shared by ``scratchpath eval`` and by the online-evaluation callback during
pretraining, so they are pure (no files, no global state), seeded, and cheap on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn

from scratchpath.backbones import prepare_input
from scratchpath.errors import ScratchpathError

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


class TileReader(Protocol):
    """What :func:`extract_features` needs from a store (``PatchStore`` satisfies it)."""

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray: ...


def tiles_to_tensor(
    tiles: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | None = None,
) -> torch.Tensor:
    """Turn ``(N, H, W, 3)`` uint8 RGB tiles into normalised ``(N, 3, S, S)`` float32
    (:func:`scratchpath.backbones.prepare_input`: resized bilinear, antialiased, to
    ``input_size`` when given and different, i.e. the whole tile at another µm/px)."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    return prepare_input(x, mean=mean, std=std, input_size=input_size)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    store: TileReader,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    indices: ArrayLike | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
) -> torch.Tensor:
    """Embed tiles of ``store`` with ``model`` (its pooled ``forward`` output).

    Args:
        model: a backbone whose ``forward`` maps ``(B, 3, S, S)`` to ``(B, D)``.
        store: a :class:`~scratchpath.store.PatchStore` (anything with ``read(indices)``).
        mean, std: RGB normalisation on the 0..1 scale (the model's training statistics).
        indices: tiles to embed, in that order (default: all tiles).
        batch_size: tiles per forward pass.
        device: where the forward pass runs; the result is always on the CPU.
        input_size: resize tiles to this side length first (None: use tiles as stored).

    Returns:
        ``(N, D)`` float32 features on the CPU. The model's train/eval mode is restored after.
    """
    if indices is None:
        order = np.arange(len(store))
    else:
        order = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
    if batch_size < 1:
        raise ScratchpathError(f"batch_size: must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            tiles = store.read(order[start : start + batch_size])
            x = tiles_to_tensor(tiles, mean=mean, std=std, input_size=input_size).to(device)
            chunks.append(model(x).float().flatten(1).cpu())  # (B, D)
    finally:
        model.train(was_training)
    if not chunks:
        raise ScratchpathError("indices: no tiles to embed")
    return torch.cat(chunks)


def _as_labels(labels: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(torch.as_tensor(labels).cpu()), dtype=torch.long)


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall) and macro-F1 of predictions."""
    t = _as_labels(y_true).numpy()
    p = _as_labels(y_pred).numpy()
    return {
        "accuracy": float(accuracy_score(t, p)),
        "balanced_accuracy": float(balanced_accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
    }


def _check_pair(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ScratchpathError(f"{name}_features: expected (N, D), got {tuple(features.shape)}")
    if len(features) != len(labels):
        raise ScratchpathError(
            f"{name}_labels: {len(labels)} labels for {len(features)} feature rows"
        )
    if len(features) == 0:
        raise ScratchpathError(f"{name}_features: empty")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: ArrayLike,
    test_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class predictions of the temperature-weighted cosine kNN of :func:`knn_eval`."""
    train_y = _as_labels(train_labels)
    _check_pair(train_features, train_y, "train")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    n_classes = int(train_y.max()) + 1
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (b, N_train) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, train_y[top_idx], weights)  # (b, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_eval(
    train_features: torch.Tensor,
    train_labels: ArrayLike,
    test_features: torch.Tensor,
    test_labels: ArrayLike,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Weighted k-nearest-neighbour classification on frozen features.

    Follows the kNN monitor of DINO (Caron et al., *Emerging Properties in Self-Supervised
    Vision Transformers*, ICCV 2021, after Wu et al. 2018): L2-normalised features, the ``k``
    most cosine-similar training samples vote for their class with weight
    ``exp(similarity / temperature)``.

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1"}`` on the test set.
    """
    test_y = _as_labels(test_labels)
    _check_pair(test_features, test_y, "test")
    pred = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature)
    return classification_metrics(test_y, pred)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: ArrayLike,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Module:
    """Train a standardised linear classifier on frozen features (see :func:`linear_probe_eval`).

    Returns a module mapping raw ``(N, D)`` features to ``(N, C)`` logits (the standardisation
    with the training mean/std is part of the module).
    """
    train_y = _as_labels(train_labels)
    _check_pair(train_features, train_y, "train")
    x = train_features.float().cpu()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    n_classes = int(train_y.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    z = (x - mean) / std
    with torch.enable_grad(), _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(z), generator=generator)
            for start in range(0, len(z), batch_size):
                batch = order[start : start + batch_size]
                loss = F.cross_entropy(head(z[batch]), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return _StandardisedLinear(head.eval(), mean, std)


@contextmanager
def _one_thread() -> Iterator[None]:
    # A (256, D) x (D, C) step is far too small to share between threads; on a busy machine
    # intra-op threads made the probe 30x slower (7.3 s vs 0.25 s measured for 700 x 32).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _StandardisedLinear(nn.Module):
    def __init__(self, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features.float() - self.mean) / self.std)


def linear_probe_eval(
    train_features: torch.Tensor,
    train_labels: ArrayLike,
    test_features: torch.Tensor,
    test_labels: ArrayLike,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Linear probe: a logistic-regression head on frozen, standardised features.

    Features are standardised with the training set's per-dimension mean/std, then one
    ``nn.Linear`` is trained with AdamW (mini-batches of 256, cosine learning-rate decay) for
    ``epochs`` passes; the shuffling and initialisation use ``seed`` only, so results repeat.
    This is the linear-evaluation protocol of SimCLR/DINO minus augmentation (features are
    extracted once).

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1"}`` on the test set.
    """
    test_y = _as_labels(test_labels)
    _check_pair(test_features, test_y, "test")
    probe = fit_linear_probe(
        train_features, train_labels, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed
    )
    with torch.no_grad():
        pred = probe(test_features.cpu()).argmax(dim=1)
    return classification_metrics(test_y, pred)


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of an embedding matrix (RankMe).

    Garrido et al., *RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
    Representations by Their Rank*, ICML 2023: with singular values ``s`` of the ``(N, D)``
    feature matrix, ``p = s / sum(s) + eps`` and RankMe ``= exp(-sum p log p)``. It lies in
    ``[1, min(N, D)]``; a collapsed representation scores near 1.
    """
    if features.ndim != 2 or min(features.shape) == 0:
        raise ScratchpathError(f"features: expected non-empty (N, D), got {tuple(features.shape)}")
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))
