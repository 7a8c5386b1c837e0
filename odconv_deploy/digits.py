"""A real trained ODConv model: od_tinynet on scikit-learn's 8x8 handwritten digits.

The dataset ships inside scikit-learn, so nothing is downloaded. Training follows the ODConv
recipe (temperature annealed from 30 to 1 over the first epochs) and takes seconds on a CPU;
the resulting weights are committed as ``weights/od_tinynet_digits.pt`` and rebuilt with
``python -m odconv_deploy.digits``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from odconv_deploy.errors import require_backend
from odconv_deploy.models import create_model

WEIGHTS = Path(__file__).parent / "weights" / "od_tinynet_digits.pt"
#: Pixels are scaled from 0..16 to [0, 1], then normalised with these.
MEAN, STD = (0.3,), (0.4,)
#: Model arguments of the digits classifier.
MODEL_KWARGS = {"kernel_num": 4, "in_channels": 1, "input_size": 8, "num_classes": 10,
                "width": 16, "mean": MEAN, "std": STD}


@dataclass
class DigitsSplit:
    """Normalised images ``[N, 1, 8, 8]`` float32 and labels ``[N]``."""

    images: np.ndarray
    labels: np.ndarray


def load_digits_splits(seed: int = 0, test_fraction: float = 0.2) -> tuple[DigitsSplit,
                                                                             DigitsSplit]:
    """Train and test splits (stratified, seeded) of scikit-learn's digits."""
    datasets = require_backend("sklearn.datasets", extra="train", purpose="The digits dataset")
    data = datasets.load_digits()
    images = ((data.images / 16.0 - MEAN[0]) / STD[0]).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        test_idx += list(rng.choice(idx, size=round(len(idx) * test_fraction), replace=False))
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    return (DigitsSplit(images[~test_mask], labels[~test_mask]),
            DigitsSplit(images[test_mask], labels[test_mask]))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set the attention temperature of every ODConv layer."""
    for m in model.modules():
        if hasattr(m, "update_temperature") and hasattr(m, "attention"):
            m.update_temperature(temperature)


def train_digits_model(*, epochs: int = 40, seed: int = 0, anneal_epochs: int = 10,
                       log: bool = False) -> tuple[nn.Module, float]:
    """Train the digits classifier; returns the model (eval mode, T=1) and test accuracy."""
    torch.manual_seed(seed)
    train, test = load_digits_splits(seed)
    model = create_model("od_tinynet", **MODEL_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        # ODConv recipe: temperature from 30 down to 1 over the first epochs.
        set_temperature(model, max(1.0, 30.0 - 29.0 * epoch / max(1, anneal_epochs)))
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if log:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    set_temperature(model, 1.0)
    model.eval()
    with torch.no_grad():
        acc = accuracy(model(torch.from_numpy(test.images)).numpy(), test.labels)
    return model, acc


def load_digits_model() -> nn.Module:
    """The committed trained digits classifier (train form, eval mode)."""
    model = create_model("od_tinynet", **MODEL_KWARGS)
    payload = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.zoo_name = "od_tinynet_digits"
    return model.eval()


def main() -> None:
    """Retrain and save the committed weights (``python -m odconv_deploy.digits``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    start = time.perf_counter()
    model, acc = train_digits_model(epochs=args.epochs, seed=args.seed, log=True)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "test_accuracy": acc, "epochs": args.epochs,
                "seed": args.seed}, args.out)
    print(f"test accuracy {acc:.4f} after {seconds:.1f} s; saved {args.out}")


if __name__ == "__main__":
    main()
