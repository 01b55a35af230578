"""The project-trained digits CNN: model and data factories for ``lowbit quantize --model-factory``.

No pretrained CNN is available offline here, so the model is trained (deterministically, about 6 s
on one core) on scikit-learn's bundled handwritten digits (1,797 8x8 images; pip install
scikit-learn): a 3-conv + 1-linear CNN, 7,178 parameters. Fixed split: 1,297 training and 500 test
images (permutation seed 0), standardised with the training mean/std.

    lowbit quantize --model-factory benchmarks/digits_cnn.py:make_model \\
        --data-factory benchmarks/digits_cnn.py:make_data --scheme int4 --method gptq --out out/digits

``make_model`` returns the trained float model (training seed 0), ``make_data`` the calibration
batches (256 training images in batches of 64) and the evaluation pair (500 test images, labels).
``benchmarks/conv_quality.py`` uses the same pieces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRAIN = 1297
CALIB = 256


def digits_split(seed: int = 0):
    """(train x, train y, test x, test y): standardised 1x8x8 images, fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits CNN needs scikit-learn for its bundled data: pip install scikit-learn "
                          "(or pip install 'lowbit[bench]')") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    mean, std = x[:TRAIN].mean(), x[:TRAIN].std()
    x = (x - mean) / std
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def digits_cnn() -> nn.Module:
    """The architecture (untrained)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def train(xtr, ytr, seed: int, epochs: int = 30) -> nn.Module:
    """Adam, 30 epochs of batches of 64. Trained on one thread, so the weights are the same bit for bit
    whatever the caller's thread setting (the factory is called again by ``lowbit eval``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = digits_cnn()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def make_model(seed: int = 0) -> nn.Module:
    """Model factory: the digits CNN trained with ``seed``."""
    xtr, ytr, _, _ = digits_split()
    return train(xtr, ytr, seed)


def make_data() -> dict:
    """Data factory: calibration batches and the (test images, labels) evaluation pair."""
    xtr, _, xte, yte = digits_split()
    return {"calibration": [xtr[i:i + 64] for i in range(0, CALIB, 64)], "evaluation": (xte, yte)}
