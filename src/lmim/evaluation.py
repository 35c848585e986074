"""Frozen-encoder evaluation: feature extraction and a weighted cosine k-NN classifier."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

# What runs the encoder: (images, sorted layer indices) -> one (B, [1 +] N, D) output per layer.
EncoderForward = Callable[[torch.Tensor, list[int]], Sequence[torch.Tensor]]


@torch.no_grad()
def extract_layer_features(
    encoder: nn.Module,
    loader: DataLoader,
    layers: Sequence[int] = (-1,),
    pool: str = "avg",
    device: torch.device | str | None = None,
    forward: EncoderForward | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of a frozen encoder at several layers from one pass: nothing masked, eval mode.

    Args:
        encoder: a masked encoder (:class:`lmim.models.MaskedViT` or ``MaskedSwin``).
        loader: yields (images, labels), in a fixed order.
        layers: encoder layers (ViT blocks or Swin stages); negative counts from the top.
        pool: "avg" (mean of the patch tokens) or "cls" (ViT cls token).
        device: where to run (default: the encoder's).
        forward: runs the encoder on (images, layers); default ``encoder(images, None, layers)``.
            Under DDP / FSDP pass the strategy's wrapped model (see
            :meth:`lmim.module.LocalMIMModule.forward`), whose forward gathers sharded weights.

    Returns:
        One (N, D) float32 feature tensor per layer, and the (N,) long labels, in loader order.
    """
    if pool not in ("avg", "cls"):
        raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
    prefix = int(encoder.num_prefix_tokens)
    if pool == "cls" and not prefix:
        raise ValueError("pool='cls' needs an encoder with a cls token (a ViT)")
    taps = [layer % encoder.depth for layer in layers]
    device = device or next(encoder.parameters()).device
    if forward is None:
        forward = lambda images, taps: encoder(images, None, taps)  # noqa: E731
    was_training = encoder.training
    encoder.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in taps]
    labels = []
    for images, y in loader:
        outs = forward(images.to(device), sorted(set(taps)))  # each (B, [1 +] N, D)
        by_layer = dict(zip(sorted(set(taps)), outs, strict=True))
        for i, tap in enumerate(taps):
            x = by_layer[tap]
            pooled = x[:, 0] if pool == "cls" else x[:, prefix:].mean(dim=1)
            feats[i].append(pooled.float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    encoder.train(was_training)
    return [torch.cat(f) for f in feats], torch.cat(labels)


def extract_features(
    encoder: nn.Module,
    loader: DataLoader,
    layer: int = -1,
    pool: str = "avg",
    device: torch.device | str | None = None,
    forward: EncoderForward | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one layer of a frozen encoder (see :func:`extract_layer_features`).

    Returns:
        (N, D) float32 features and (N,) long labels, in loader order.
    """
    feats, labels = extract_layer_features(encoder, loader, [layer], pool, device, forward)
    return feats[0], labels


def shard_indices(n: int, world: int, rank: int) -> list[int]:
    """A process's share of ``n`` samples for a distributed extraction: ``rank, rank + world,
    ...`` (``DistributedSampler`` without shuffling), padded by wrapping around so that every
    process runs the same number of forwards (DDP and FSDP forwards are collectives).

    Returns:
        ``ceil(n / world)`` indices; :func:`unshard` drops the padding again.
    """
    return [(rank + world * j) % n for j in range(math.ceil(n / world))]


def unshard(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """Undo :func:`shard_indices` on gathered results.

    Args:
        gathered: (world, ceil(n / world), ...) every process's results, by rank.
        n: samples before sharding.

    Returns:
        (n, ...) in sample order, without the padding.
    """
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:n]


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Cosine k-NN with temperature-weighted votes (each neighbour votes exp(sim / T)).

    Args:
        train_feats: (N, D) reference features.
        train_labels: (N,) their labels.
        query_feats: (M, D) features to classify.
        num_classes: number of classes.
        k: neighbours.
        temperature: vote temperature.
        chunk: queries per similarity block (bounds memory at M x N / chunk).

    Returns:
        (M, num_classes) vote scores; argmax is the prediction.
    """
    ref = F.normalize(train_feats.float(), dim=1)
    k = min(k, ref.shape[0])
    out = []
    for q in F.normalize(query_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ ref.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` (torchmetrics), in [0, 1]."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return float(metric(scores, test_labels))


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
) -> float:
    """Top-1 of a linear probe fitted on cached features, in [0, 1].

    MAE's probe (a BatchNorm without affine parameters, then a Linear) fitted to convergence:
    the features are standardised with the training set's statistics (what that BatchNorm does
    at test time) and a multinomial logistic regression with L2 ``weight_decay`` is fitted by
    full-batch L-BFGS. Deterministic, and seconds for 10^4 x 10^3 features on a CPU; the
    SGD-trained probe with a Lightning Trainer is ``python -m lmim.linprobe``.
    """
    x = train_feats.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_feats.double() - mean) / std
    linear = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), train_labels)
        loss = loss + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        scores = linear(xt).float()
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return float(metric(scores, test_labels))


# -- plumbing shared by the evaluation entry points (lmim.linprobe, lmim.finetune) -------------


def accuracy_metrics(num_classes: int) -> nn.ModuleDict:
    """torchmetrics top-1 and, with at least 5 classes, top-5 accuracy (micro-averaged), keyed
    ``top1`` / ``top5``."""
    metrics = {"top1": MulticlassAccuracy(num_classes=num_classes, average="micro")}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)


def labelled_datamodule(cfg):
    """Seed the run, then build the ``data`` group and check both labelled splits (``train``
    and ``val``) before anything is computed."""
    import logging

    import lightning as L

    from lmim.errors import ConfigError
    from lmim.utils import instantiate_checked

    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate_checked(cfg.data)
    if getattr(dm, "num_classes", None) is None or not hasattr(dm, "labelled_dataset"):
        raise ConfigError(
            f"data={cfg.data._target_} has no labels: use data=imagefolder (train/ and val/ "
            "class folders), data=fashion_mnist or data=demo"
        )
    dm.validate_labelled()
    if dm.num_classes < 5:
        logging.getLogger("lmim").info(
            "val/top5 is not reported: the data has %d classes (fewer than 5)", dm.num_classes
        )
    return dm


def fit_metrics(cfg, module, train_loader: DataLoader, val_loader: DataLoader) -> dict:
    """Fit ``module`` with the ``trainer`` and ``logger`` groups; return its validation
    metrics (``val/top1`` and, when logged, ``val/top5``). The W&B run is finished also when
    fitting fails."""
    from lmim.utils import build_loggers, finish_wandb, instantiate_checked

    loggers = build_loggers(cfg.get("logger"))
    trainer = instantiate_checked(cfg.trainer, logger=loggers or False, callbacks=[])
    try:
        trainer.fit(module, train_loader, val_loader)
    finally:
        finish_wandb()
    return {
        k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/top1", "val/top5")
    }


def run_entry_point(run, cfg) -> float:
    """Run an evaluation job and print its accuracies; a ConfigError becomes one line on
    stderr and exit status 2."""
    from lmim.cli import fail
    from lmim.errors import ConfigError

    try:
        result = run(cfg)
    except ConfigError as err:
        fail(str(err))
    for key in ("val/top1", "val/top5"):
        if key in result:
            print(f"{key}: {result[key]:.4f}")
    return result["val/top1"]
