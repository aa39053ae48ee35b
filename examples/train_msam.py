"""Train a small MLP on a synthetic classification task with SGD-momentum and with MSAM (etfkern.optim).

    python examples/train_msam.py [--steps 300] [--rho 0.3] [--norm exact|lagged]

The data: 20-dimensional Gaussian inputs labelled by a fixed random 2-layer teacher (10 classes), with 10% of
the training labels flipped. Both optimizers start from the same weights and see the same batches. MSAM keeps
the parameters at the perturbed point between steps; evaluation runs inside ``opt.unperturbed()``.
Runs in a few seconds on a CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from etfkern.optim import MSAM


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(n, 20, generator=gen)
        y = teacher(x).argmax(1)
    return x, y


def model_fn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(name: str, steps: int, rho: float, norm: str) -> dict:
    x, y = make_data(6000, seed=1)
    x_train, y_train, x_test, y_test = x[:4000], y[:4000].clone(), x[4000:], y[4000:]
    flip = torch.Generator().manual_seed(2)
    noisy = torch.rand(len(y_train), generator=flip) < 0.1
    y_train[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=flip)
    model = model_fn()
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=rho, weight_decay=5e-4, norm=norm)
    gen = torch.Generator().manual_seed(3)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    evaluate = opt.unperturbed() if isinstance(opt, MSAM) else torch.no_grad()
    with evaluate:
        return {"optimizer": name, "train_acc": accuracy(model, x_train, y_train),
                "test_acc": accuracy(model, x_test, y_test), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rho", type=float, default=0.3)
    ap.add_argument("--norm", choices=["exact", "lagged"], default="exact")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a tiny model runs best on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("sgd", "msam"):
        r = train(name, args.steps, args.rho, args.norm)
        print(f"{r['optimizer']:5s} train acc {r['train_acc']:.3f}  test acc {r['test_acc']:.3f}  "
              f"({r['seconds']:.2f} s for {args.steps} steps)")


if __name__ == "__main__":
    main()
