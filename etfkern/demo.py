"""`etfkern demo`: the end-to-end run a new user sees first.

Builds a 10k-class EBV bank, trains a small network on synthetic clustered data with :class:`etfkern.nn.EBVHead`
and :class:`etfkern.optim.MSAM`, streams neural-collapse metrics every epoch with :class:`etfkern.CollapseMeter`,
and times the fused loss against the eager one (normalize + matmul + cross_entropy) on the run's own shapes.
Writes ``metrics.json`` and ``metrics.png`` into the output folder and prints a table per epoch.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class DemoConfig:
    classes: int = 10_000
    dim: int = 256            # EBV dimension (d=256: a Kerdock bank holds 33,024 vectors at |cos| <= 1/16)
    in_dim: int = 64          # input features of the synthetic data
    hidden: int = 512
    samples_per_class: int = 10
    test_per_class: int = 2
    noise: float = 0.6        # within-class spread relative to unit-variance class centres
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 0.2
    momentum: float = 0.9
    rho: float = 0.3
    tau: float = 0.07
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "cpu"
    out: str = "etfkern_demo_out"


def synthetic_clusters(cfg: DemoConfig, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Gaussian clusters: x = centre[y] + noise * e; returns (x_train, y_train, x_test, y_test) on CPU."""
    centres = torch.randn(cfg.classes, cfg.in_dim, generator=generator)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(cfg.classes).repeat_interleave(per_class)
        y = y[torch.randperm(len(y), generator=generator)]
        x = centres[y] + cfg.noise * torch.randn(len(y), cfg.in_dim, generator=generator)
        return x, y

    return (*draw(cfg.samples_per_class), *draw(cfg.test_per_class))


def _model(cfg: DemoConfig) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(cfg.in_dim, cfg.hidden), torch.nn.GELU(),
        torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.GELU(),
        torch.nn.Linear(cfg.hidden, cfg.dim),
    )


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor, device: str, batch: int = 4096) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch].to(device)) for i in range(0, len(x), batch)])


def compare_losses(x: torch.Tensor, bank: torch.Tensor, y: torch.Tensor, tau: float, eps: float) -> dict[str, float]:
    """fwd+bwd time (ms) and extra peak memory (MiB) of the fused loss vs eager torch on the same batch."""
    from etfkern._core.measure import peak_mib, time_ms
    from etfkern.spherical import spherical_cross_entropy

    device = x.device

    def fused() -> None:
        xx = x.detach().requires_grad_()
        spherical_cross_entropy(xx, bank, y, tau=tau, label_smoothing=eps).backward()

    def eager() -> None:
        xx = x.detach().requires_grad_()
        logits = F.normalize(xx, dim=1) @ bank.t() / tau
        F.cross_entropy(logits, y, label_smoothing=eps).backward()

    out = {"fused_ms": time_ms(fused, device, warmup=1, rep=3), "eager_ms": time_ms(eager, device, warmup=1, rep=3),
           "fused_peak_mib": peak_mib(fused, device), "eager_peak_mib": peak_mib(eager, device),
           "logits_mib": x.shape[0] * bank.shape[0] * 4 / 2**20}
    out["speedup"] = out["eager_ms"] / out["fused_ms"]
    return out


def plot_history(history: list[dict[str, Any]], path: str) -> str | None:
    """Loss, accuracy and collapse metrics per epoch as a 2x2 PNG; returns the path (None without matplotlib)."""
    from etfkern._core.plot import agg_figure

    try:
        fig, axes = agg_figure(2, 2, figsize=(10, 7))
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    panels = [("loss", ["loss"], "linear"), ("accuracy", ["train_acc", "test_acc"], "linear"),
              ("within/between variability", ["nc1", "cdnv"], "log"),
              ("structure", ["nc2_etf_error", "nc2_equiangular", "nc4_ncc_mismatch"], "linear")]
    for ax, (title, keys, scale) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_yscale(scale)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("etfkern demo: EBV head + MSAM, collapse metrics per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``cfg.out/metrics.json``) everything it printed."""
    from tqdm.auto import tqdm

    import etfkern
    from etfkern.collapse import CollapseMeter, ncc_mismatch
    from etfkern.nn import EBVHead
    from etfkern.optim import MSAM

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = cfg.device
    os.makedirs(cfg.out, exist_ok=True)

    t0 = time.perf_counter()
    bank = etfkern.ebv_bank(cfg.classes, cfg.dim, seed=cfg.seed).to(device)
    bank_seconds = time.perf_counter() - t0
    stats = etfkern.bank_stats(bank)
    log(f"bank: {cfg.classes} x {cfg.dim} EBV in {bank_seconds:.1f}s  max|cos| {stats['max_abs_cos']:.4f} "
        f"(Welch {stats['welch_bound']:.4f}, {stats['max_abs_cos'] / stats['welch_bound']:.2f}x)")

    x_train, y_train, x_test, y_test = synthetic_clusters(cfg, gen)
    model = _model(cfg).to(device)
    head = EBVHead(bank, tau=cfg.tau, label_smoothing=cfg.label_smoothing).to(device)
    opt = MSAM(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, rho=cfg.rho, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15, cycle_momentum=False)
    log(f"data: {len(x_train)} train / {len(x_test)} test samples, {cfg.classes} classes; "
        f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; device {device}")

    header = f"{'epoch':>5} {'loss':>8} {'train':>7} {'test':>7} {'NC1':>9} {'CDNV':>9} {'NC2-etf':>8} {'NC4':>7} {'sec':>6}"
    history: list[dict[str, Any]] = []
    table = [header]
    log(header)
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            loss = head(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.3f}")

        model.eval()
        with opt.unperturbed():  # metrics at the true weights, not the MSAM-perturbed point
            feats = _features(model, x_train, device)
            test_feats = _features(model, x_test, device)
        labels = y_train.to(device)
        train_acc = float((head.predict(feats) == labels).float().mean())
        test_acc = float((head.predict(test_feats) == y_test.to(device)).float().mean())
        meter = CollapseMeter(cfg.classes, cfg.dim, device=device)
        for i in range(0, len(feats), 8192):
            meter.update(feats[i:i + 8192], labels[i:i + 8192])
        metrics = meter.compute(weights=bank)
        nc4 = ncc_mismatch(feats, meter.means, bank)
        row = {"epoch": epoch, "loss": total / count, "train_acc": train_acc, "test_acc": test_acc,
               "nc4_ncc_mismatch": nc4, "seconds": time.perf_counter() - t_epoch, **metrics}
        history.append(row)
        line = (f"{epoch:>5} {row['loss']:>8.4f} {train_acc:>7.2%} {test_acc:>7.2%} {row['nc1']:>9.4g} "
                f"{row['cdnv']:>9.4g} {row['nc2_etf_error']:>8.4f} {nc4:>7.4f} {row['seconds']:>6.1f}")
        table.append(line)
        log(line)

    with opt.unperturbed():
        sample = _features(model, x_train[: min(len(x_train), 4 * cfg.batch_size)], device)
    ys = y_train[: len(sample)].to(device)
    speed = compare_losses(sample, bank, ys, cfg.tau, cfg.label_smoothing)
    log(f"fused vs eager loss (N={len(sample)}, C={cfg.classes}, d={cfg.dim}, fwd+bwd): "
        f"{speed['fused_ms']:.1f} ms vs {speed['eager_ms']:.1f} ms ({speed['speedup']:.2f}x); extra peak memory "
        f"{speed['fused_peak_mib']:.1f} MiB vs {speed['eager_peak_mib']:.1f} MiB (logits alone {speed['logits_mib']:.1f} MiB)")

    result = {"config": asdict(cfg), "bank": {"seconds": bank_seconds, **stats}, "history": history,
              "loss_comparison": speed, "build": etfkern.build_info()}
    json_path = os.path.join(cfg.out, "metrics.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    png = plot_history(history, os.path.join(cfg.out, "metrics.png"))
    log(f"wrote {json_path}" + (f" and {png}" if png else ""))
    result["files"] = [json_path] + ([png] if png else [])
    return result
