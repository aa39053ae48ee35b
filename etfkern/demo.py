"""`etfkern demo` (`make demo`): neural collapse, watched as it happens, on a fixed EBV bank.

A small MLP learns synthetic Gaussian clusters through :class:`etfkern.nn.EBVHead` (fused
:func:`etfkern.spherical_cross_entropy` against a FIXED :func:`etfkern.ebv_bank`) with the
:class:`etfkern.optim.MSAM` optimizer, and keeps training after it fits the data (the terminal phase). After every
epoch (epoch 0 = the initialisation) a :class:`etfkern.CollapseMeter` measures the penultimate features as the head
sees them (unit vectors: the loss normalises them), so NC1 / CDNV (within-class variability), NC2 (distance of the
centred class means to a simplex ETF), NC3 (means vs. bank rows) and NC4 (classifier vs. nearest class mean) can be
seen falling (definitions: docs/metrics.md). Then the fused loss is timed against eager torch at vocabulary scale (10,000 classes).
Writes ``metrics.json``, ``metrics.png`` (curated panels) and ``collapse_metrics.png``
(:func:`etfkern.collapse.plot_metrics`, every metric) into the output folder; prints a table and a short reading.

Why these defaults: C <= d + 1 classes, so a simplex ETF exists in d dimensions (an EBV bank with C <= d is
orthonormal, and centred orthonormal rows ARE a simplex ETF); tau = 0.2, because at tau = 0.07 the loss saturates
once the data are fit (its gradient ~ C e^{-1/tau}) and the metrics stop moving, which is what the first
version of this demo showed (NC1 0.04254 -> 0.0425).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

# (key in a history row, label) of the per-epoch table
_TABLE = (("loss", "loss"), ("train_acc", "train"), ("test_acc", "test"), ("nc1", "NC1"), ("cdnv", "CDNV"),
          ("nc2_etf_error", "NC2-ETF"), ("nc3", "NC3"), ("ncc_mismatch", "NC4"))
COLLAPSE_FACTOR = 10.0  # "an order of magnitude": NC1 and CDNV must end at least this many times below epoch 0


@dataclass
class DemoConfig:
    """Everything the run depends on (defaults: about a minute on 2 idle CPU cores)."""

    classes: int = 128         # C <= dim + 1: the simplex ETF exists, so NC2 can reach 0
    dim: int = 128             # feature / bank dimension
    in_dim: int = 64           # input features of the synthetic data
    hidden: int = 256
    samples_per_class: int = 20
    test_per_class: int = 5
    noise: float = 0.6         # within-class spread relative to unit-variance class centres
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.4            # peak of a one-cycle schedule
    momentum: float = 0.9
    rho: float = 0.3           # MSAM perturbation radius
    weight_decay: float = 5e-4
    tau: float = 0.2           # see the module docstring: 0.07 saturates in the terminal phase
    label_smoothing: float = 0.0  # > 0 gives the loss a ring of minima instead of one point: it blurs collapse
    seed: int = 0
    device: str = "cpu"
    out: str = "etfkern_demo_out"
    compare_classes: int = 10_000  # the fused vs eager loss comparison, at vocabulary scale
    compare_dim: int = 256
    compare_rows: int = 4096

    def quick(self) -> "DemoConfig":
        """A smoke-test sized copy: at most 500 classes, 2 epochs, batch 256, a 2048 x 512-row loss comparison."""
        return replace(self, classes=min(self.classes, 500), epochs=min(self.epochs, 2),
                       batch_size=min(self.batch_size, 256), compare_classes=min(self.compare_classes, 2048),
                       compare_rows=min(self.compare_rows, 512))


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


def measure_epoch(epoch: int, model: torch.nn.Module, head: torch.nn.Module, data: tuple[torch.Tensor, ...],
                  device: str) -> dict[str, Any]:
    """Loss, accuracies and every collapse metric at the model's current weights (call under opt.unperturbed())."""
    from etfkern.collapse import CollapseMeter, ncc_mismatch

    x_train, y_train, x_test, y_test = data
    model.eval()
    feats = _features(model, x_train, device)
    test_feats = _features(model, x_test, device)
    labels = y_train.to(device)
    with torch.no_grad():
        loss = float(head(feats, labels))
    unit = F.normalize(feats, dim=1)  # what the head scores: spherical_cross_entropy normalises inside
    meter = CollapseMeter(head.num_classes, feats.shape[1], device=device)
    for i in range(0, len(unit), 8192):
        meter.update(unit[i:i + 8192], labels[i:i + 8192])
    metrics = meter.compute(weights=head.bank)
    return {"epoch": epoch, "loss": loss,
            "train_acc": float((head.predict(feats) == labels).float().mean()),
            "test_acc": float((head.predict(test_feats) == y_test.to(device)).float().mean()),
            "ncc_mismatch": ncc_mismatch(unit, meter.means, head.bank), **metrics}


def bank_floor(bank: torch.Tensor) -> dict[str, float]:
    """NC2 of the bank rows themselves: where the class means end when each equals its bank row (the floor)."""
    from etfkern.collapse import CollapseMeter

    meter = CollapseMeter(bank.shape[0], bank.shape[1], device=bank.device)
    meter.update(bank, torch.arange(bank.shape[0], device=bank.device))
    return meter.compute(metrics=["nc2_etf_error", "nc2_equiangular", "nc2_maxangle"])


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


def _first_fit_epoch(history: list[dict[str, Any]]) -> int | None:
    """The first epoch with 100% training accuracy (the terminal phase starts there), None if never."""
    return next((h["epoch"] for h in history if h["train_acc"] >= 1.0), None)


def _factor(first: float, last: float) -> float:
    """How many times smaller ``last`` is than ``first`` (inf when last is 0, nan when either is not finite)."""
    if not (math.isfinite(first) and math.isfinite(last)):
        return math.nan
    return math.inf if last <= 0 else first / last


def read_result(history: list[dict[str, Any]], floor: dict[str, float], cfg: DemoConfig) -> tuple[dict, list[str]]:
    """(summary dict, printed lines): what the run shows, compared with epoch 0 (the initialisation)."""
    first, last = history[0], history[-1]
    fit = _first_fit_epoch(history)
    nc1_x, cdnv_x = _factor(first["nc1"], last["nc1"]), _factor(first["cdnv"], last["cdnv"])
    etf_x = _factor(first["nc2_etf_error"], last["nc2_etf_error"])
    simplex = cfg.classes <= cfg.dim + 1
    collapsed = (fit is not None and nc1_x >= COLLAPSE_FACTOR and cdnv_x >= COLLAPSE_FACTOR
                 and last["nc2_etf_error"] < first["nc2_etf_error"])
    summary = {"fit_epoch": fit, "nc1_factor": nc1_x, "cdnv_factor": cdnv_x, "nc2_etf_factor": etf_x,
               "terminal_epochs": None if fit is None else last["epoch"] - fit, "collapsed": collapsed,
               "simplex_possible": simplex, "bank_nc2_etf_error": floor["nc2_etf_error"]}
    lines = ["reading (epoch 0 = initialisation; features = the unit vectors the head scores):"]
    if fit is None:
        lines.append(f"  fit: the training data were never fit (train accuracy {last['train_acc']:.2%}); "
                     "there is no terminal phase yet: train longer (--epochs) or raise --lr")
    else:
        lines.append(f"  fit: 100% train accuracy from epoch {fit}; the {last['epoch'] - fit} epochs after it are the "
                     f"terminal phase (test accuracy {last['test_acc']:.2%})")
    lines.append(f"  NC1  {first['nc1']:.4g} -> {last['nc1']:.3g} ({nc1_x:.3g}x smaller), CDNV {first['cdnv']:.3g} -> "
                 f"{last['cdnv']:.3g} ({cdnv_x:.3g}x): each class shrinks onto its mean")
    if simplex:
        target = (f"0 = the centred means form a simplex ETF; C = {cfg.classes} <= d + 1, and the bank itself "
                  f"reaches {floor['nc2_etf_error']:.4f}")
    else:
        target = (f"C = {cfg.classes} > d + 1 = {cfg.dim + 1}: no simplex exists in d dimensions; the bank's own rows "
                  f"give {floor['nc2_etf_error']:.4f}, the floor here")
    lines.append(f"  NC2  ETF error {first['nc2_etf_error']:.3f} -> {last['nc2_etf_error']:.3f} ({target})")
    lines.append(f"  NC3  {first['nc3']:.3f} -> {last['nc3']:.4f}: the class means line up with their fixed bank rows; "
                 f"NC4 {last['ncc_mismatch']:.4f}: the head's choice is the nearest class mean")
    if collapsed:
        lines.append(f"  => neural collapse: NC1 and CDNV fell {COLLAPSE_FACTOR:.0f}x or more and NC2 moved toward the "
                     + ("simplex." if simplex else "bank's geometry."))
    else:
        lines.append(f"  => no clear collapse in this run (needs: data fit, NC1 and CDNV {COLLAPSE_FACTOR:.0f}x lower, "
                     "NC2 lower): try more --epochs")
    return summary, lines


def _matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from etfkern.collapse.plot import MATPLOTLIB_HINT

        return f"plots skipped: matplotlib is not installed. To get them: {MATPLOTLIB_HINT}, then run the demo again"
    return None


def plot_history(history: list[dict[str, Any]], path: str, *, floor: dict[str, float] | None = None,
                 comparison: dict[str, float] | None = None, title: str = "") -> Any:
    """The demo's 2 x 3 panels (loss, accuracy + NC4, NC1 + CDNV, NC2, NC3, fused vs eager) to a PNG; the Figure."""
    from etfkern.collapse.plot import draw_series, figure, log_scale_fits

    fig, axes = figure(2, 3, figsize=(15, 8.5))
    epochs = [h["epoch"] for h in history]
    fit = _first_fit_epoch(history)
    panels = [
        ("training loss (true weights)", [("loss", "spherical CE")], None),
        ("accuracy and NC4", [("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
                              ("ncc_mismatch", "NC4: classifier != nearest mean")], "fraction"),
        ("NC1: within-class variability", [("nc1", "NC1 = tr(Sw Sb+)/C"), ("cdnv", "CDNV")], None),
        ("NC2: class means vs simplex ETF", [("nc2_etf_error", "ETF error"), ("nc2_equinorm", "equinorm"),
                                             ("nc2_equiangular", "equiangular"), ("nc2_maxangle", "max-angle")], None),
        ("NC3: class means vs bank rows", [("nc3", "NC3 = |W/|W| - M/|M||^2"), ("unc3", "UNC3 (std of cos)")], None),
    ]
    for ax, (name, series, ylabel) in zip(axes.flat, panels):
        values = []
        for key, label in series:
            ys = [h.get(key, math.nan) for h in history]
            draw_series(ax, epochs, ys, label=label)
            values += ys
        if floor is not None and name.startswith("NC2") and floor["nc2_etf_error"] > 1e-3:
            ax.axhline(floor["nc2_etf_error"], color="gray", linestyle="--", label="ETF error of the bank (floor)")
        if log_scale_fits(values, 1.0):
            ax.set_yscale("log")
        if fit is not None:
            ax.axvline(fit, color="gray", linestyle=":", linewidth=1, label=f"100% train accuracy (epoch {fit})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch (0 = initialisation)", fontsize=8)
        ax.set_ylabel(ylabel or "value (log scale)" if ax.get_yscale() == "log" else ylabel or "value", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
        ax.legend(fontsize=7)
    ax = axes.flat[5]
    if comparison is not None:
        groups = [("fwd+bwd time (ms)", "fused_ms", "eager_ms"), ("extra peak memory (MiB)", "fused_peak_mib",
                                                                   "eager_peak_mib")]
        for offset, (impl, color) in enumerate((("etfkern fused", "tab:blue"), ("eager torch", "tab:orange"))):
            xs = [g + (offset - 0.5) * 0.38 for g in range(len(groups))]
            ys = [comparison[g[1 + offset]] for g in groups]
            bars = ax.bar(xs, ys, width=0.36, color=color, label=impl)
            ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in ys], fontsize=8)
        ax.hlines(comparison["logits_mib"], 0.55, 1.45, colors="gray", linestyles="--", linewidth=1,
                  label=f"the N x C logits alone: {comparison['logits_mib']:.0f} MiB")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        top = max(comparison[key] for g in groups for key in g[1:]) * 1.25
        ax.set_ylim(0, max(top, 1.1 * comparison["logits_mib"]))  # linear from 0: bar lengths are the ratios
        ax.set_ylabel("ms / MiB", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.set_title(f"loss at vocabulary scale: N={comparison['rows']}, C={comparison['classes']}, "
                     f"d={comparison['dim']}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def run_demo(cfg: DemoConfig, *, progress: bool = True, plots: bool = True,
             log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``cfg.out/metrics.json``) everything it printed. plots=False: no PNGs."""
    from tqdm.auto import tqdm

    import etfkern
    from etfkern.nn import EBVHead
    from etfkern.optim import MSAM

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = cfg.device
    os.makedirs(cfg.out, exist_ok=True)

    t0 = time.perf_counter()
    bank = etfkern.ebv_bank(cfg.classes, cfg.dim, seed=cfg.seed).to(device)
    bank_seconds = time.perf_counter() - t0
    stats = etfkern.bank_stats(bank)
    floor = bank_floor(bank)
    log(f"bank: {cfg.classes} x {cfg.dim} EBV in {bank_seconds:.1f}s, max|cos| {stats['max_abs_cos']:.4f} "
        f"(Welch bound {stats['welch_bound']:.4f})" + ("; C <= d: orthonormal rows, centred they form a simplex ETF"
                                                        if cfg.classes <= cfg.dim else ""))

    data = synthetic_clusters(cfg, gen)
    x_train, y_train = data[0], data[1]
    model = _model(cfg).to(device)
    head = EBVHead(bank, tau=cfg.tau, label_smoothing=cfg.label_smoothing).to(device)
    opt = MSAM(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, rho=cfg.rho, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15, cycle_momentum=False)
    log(f"data: {len(x_train)} train / {len(data[2])} test samples, {cfg.classes} Gaussian clusters in {cfg.in_dim}-d; "
        f"MLP {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params -> EBVHead (tau {cfg.tau}) + MSAM "
        f"(rho {cfg.rho}); {cfg.epochs} epochs on {device}")

    header = f"{'epoch':>5} " + " ".join(f"{label:>8}" for _, label in _TABLE) + f" {'sec':>6}"
    history: list[dict[str, Any]] = []
    table = [header]
    log(header)

    def record(row: dict[str, Any], seconds: float) -> None:
        row["seconds"] = seconds
        history.append(row)
        cells = []
        for key, _ in _TABLE:
            v = row[key]
            cells.append(f"{v:>8.2%}" if key.endswith("_acc") else f"{v:>8.4g}")
        line = f"{row['epoch']:>5} " + " ".join(cells) + f" {seconds:>6.1f}"
        table.append(line)
        log(line)

    t_epoch = time.perf_counter()
    record(measure_epoch(0, model, head, data, device), time.perf_counter() - t_epoch)
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            loss = head(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with opt.unperturbed():  # metrics at the true weights, not the MSAM-perturbed point
            record(measure_epoch(epoch, model, head, data, device), time.perf_counter() - t_epoch)
    train_seconds = sum(h["seconds"] for h in history)

    summary, reading = read_result(history, floor, cfg)
    for line in reading:
        log(line)

    cmp_bank = etfkern.ebv_bank(cfg.compare_classes, cfg.compare_dim, seed=cfg.seed).to(device)
    cmp_gen = torch.Generator().manual_seed(cfg.seed + 1)
    cmp_x = torch.randn(cfg.compare_rows, cfg.compare_dim, generator=cmp_gen).to(device)
    cmp_y = torch.randint(0, cfg.compare_classes, (cfg.compare_rows,), generator=cmp_gen).to(device)
    speed = compare_losses(cmp_x, cmp_bank, cmp_y, cfg.tau, cfg.label_smoothing)
    speed.update(rows=cfg.compare_rows, classes=cfg.compare_classes, dim=cfg.compare_dim)
    log(f"fused vs eager loss at vocabulary scale (N={cfg.compare_rows}, C={cfg.compare_classes}, d={cfg.compare_dim}, "
        f"fwd+bwd): {speed['fused_ms']:.1f} ms vs {speed['eager_ms']:.1f} ms ({speed['speedup']:.2f}x); extra peak "
        f"memory {speed['fused_peak_mib']:.1f} MiB vs {speed['eager_peak_mib']:.1f} MiB (the logits alone "
        f"{speed['logits_mib']:.1f} MiB)")

    result = {"config": asdict(cfg), "bank": {"seconds": bank_seconds, **stats}, "bank_floor": floor,
              "history": history, "summary": summary, "reading": reading, "table": table,
              "loss_comparison": speed, "train_and_measure_seconds": train_seconds,
              "seconds": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
              "build": etfkern.build_info()}
    json_path = os.path.join(cfg.out, "metrics.json")
    files = [json_path]
    missing = _matplotlib_missing() if plots else None
    if missing:
        log(missing)
    elif plots:
        from etfkern.collapse import METRIC_KEYS, plot_metrics

        title = (f"etfkern demo: {cfg.classes}-class EBV bank (d={cfg.dim}), EBVHead + MSAM: neural collapse per "
                 "epoch")
        png = os.path.join(cfg.out, "metrics.png")
        plot_history(history, png, floor=floor, comparison=speed, title=title)
        keys = [k for k in METRIC_KEYS if k in history[0] and k != "num_classes_seen"] + ["ncc_mismatch"]
        all_png = os.path.join(cfg.out, "collapse_metrics.png")
        plot_metrics(history, all_png, x=[h["epoch"] for h in history], keys=keys, xlabel="epoch",
                     title="every CollapseMeter metric per epoch (etfkern.collapse.plot_metrics)")
        files += [png, all_png]
    result["seconds"] = time.perf_counter() - t_start
    result["files"] = files
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    log(f"wrote {', '.join(files)} in {result['seconds']:.0f} s")
    return result
