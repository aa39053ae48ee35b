"""The ``etfkern`` command line (``python -m etfkern ...``).

Subcommands register themselves in :data:`COMMANDS`: each adds a parser and a function returning an exit code
(0 ok, 1 the work failed, 2 bad arguments or missing files).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Callable

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str,  # noqa: A002 - argparse's word
            arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: register ``run(args) -> int`` as subcommand ``name``; ``arguments(parser)`` adds its flags."""

    def wrap(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments or (lambda p: None), run)
        return run

    return wrap


class UsageError(Exception):
    """Bad argument or missing file: printed without a traceback, exit code 2."""


def _device(value: str | None, flag: str = "--device", default: str | None = None) -> str | None:
    """``value`` checked as a torch device that can run here (``default`` when None); UsageError otherwise."""
    if value is None:
        return default
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{flag} {value!r} is not a torch device (cpu, cuda, cuda:1, ...): {exc}") from None
    if device.type not in ("cpu", "cuda", "meta"):  # mps, xla, xpu, ...: no etfkern kernel runs there
        raise UsageError(f"{flag} {value}: etfkern runs on cpu and cuda devices only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {value}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "meta":
        raise UsageError(f"{flag} meta: the meta device holds no data; use cpu or cuda")
    return str(device)


def _output_file(path: str, flag: str) -> None:
    """UsageError unless ``path`` can be created as a file: its folder exists and it is not a folder itself."""
    import os

    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: directory of {path!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag}: directory of {path!r} is not writable")


# ----------------------------------------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


@command("info", "versions, build, and which backends can run here (and why the others cannot)",
         arguments=_info_arguments)
def cmd_info(args: argparse.Namespace) -> int:
    import etfkern
    from etfkern._core import backend as _backend

    info = etfkern.build_info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {d: _backend.availability(d) for d in devices}
    try:
        requested, bad_env = _backend.requested(), None
    except ValueError as exc:  # a bad ETFKERN_BACKEND: report it with everything else, then exit 2
        requested, bad_env = "invalid", str(exc)
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "build": info,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "requested_backend": requested,
        "backends": backends,
    }
    if bad_env:
        report["requested_backend_error"] = bad_env
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        if bad_env:
            raise UsageError(bad_env)
        return EXIT_OK
    print(f"etfkern {info['etfkern']}  torch {info['torch']}  python {report['python']}")
    print(f"triton: {info.get('triton') or 'missing (' + info.get('triton_error', '?') + ')'}")
    if info["compiled"]:
        print(f"compiled library: yes  compiler={info['compiler']}  openmp={info['openmp']} "
              f"(threads {info['openmp_max_threads']})  cuda={info['cuda']} {info['cuda_archs']}")
    else:
        print(f"compiled library: NO ({info['compiled_error']}) - torch fallbacks in use")
    print(f"GPU: {report['cuda_device'] or 'none'}   ETFKERN_BACKEND={report['requested_backend']}")
    for device, table in backends.items():
        print(f"backends for {device} tensors:")
        for name, why in table.items():
            print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    if bad_env:
        raise UsageError(bad_env)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from etfkern.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--out", default=d.out, help=f"output folder for metrics.json and metrics.png (default {d.out})")
    p.add_argument("--classes", type=int, default=d.classes, help=f"number of classes (default {d.classes})")
    p.add_argument("--dim", type=int, default=d.dim, help=f"EBV dimension (default {d.dim})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rho", type=float, default=d.rho, help="MSAM perturbation radius")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="a small run for smoke tests: at most 500 classes, 2 epochs, batch size 256, "
                        "a 2048-class loss comparison")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("demo", "end-to-end run: EBV bank, EBVHead + MSAM training, collapse metrics per epoch, fused vs eager loss",
         arguments=_demo_arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    import math
    import os

    from etfkern.demo import DemoConfig, run_demo

    device = _device(args.device, default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("classes", "dim", "epochs", "samples_per_class", "batch_size"):
        if getattr(args, name) < (2 if name == "classes" else 1):
            least = "at least 2" if name == "classes" else "positive"
            raise UsageError(f"--{name.replace('_', '-')} must be {least}, got {getattr(args, name)}")
    for name in ("lr", "rho"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            raise UsageError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a folder (created if missing)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out!r}: cannot create the folder: {exc}") from None
    cfg = DemoConfig(classes=args.classes, dim=args.dim, epochs=args.epochs, samples_per_class=args.samples_per_class,
                     batch_size=args.batch_size, lr=args.lr, rho=args.rho, seed=args.seed, device=device, out=args.out)
    if args.quick:
        cfg = cfg.quick()
    run_demo(cfg, progress=not args.no_progress and sys.stderr.isatty())
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
def _load_tensor(path: str, what: str) -> torch.Tensor:
    """A tensor from .pt/.pth (tensor or single-tensor dict), .npy, or .safetensors (single tensor)."""
    import os

    if not os.path.exists(path):
        raise UsageError(f"{what} file not found: {path}")
    try:
        if path.endswith(".npy"):
            import numpy as np

            return torch.from_numpy(np.load(path, mmap_mode="r")[...].copy())
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"cannot read {what} file {path} ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise UsageError(f"{what} file {path} holds {len(obj)} tensors ({sorted(obj)}); expected one")
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{what} file {path} does not hold a tensor")
    return obj


def _collapse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="(N, d) features: .pt, .npy or .safetensors")
    p.add_argument("--labels", required=True, help="(N,) integer labels: .pt, .npy or .safetensors")
    p.add_argument("--num-classes", type=int, default=None, help="C (default: max label + 1)")
    p.add_argument("--weights", default=None, help="optional (C, d) classifier for NC3 / UNC3 / NC4 (ncc_mismatch)")
    p.add_argument("--ignore-index", type=int, default=-100,
                   help="rows with this label are skipped (default -100, torch's convention)")
    p.add_argument("--min-count", type=int, default=1,
                   help="leave classes with fewer samples out of the metrics (default 1); the output says how many")
    p.add_argument("--global-mean", choices=["class", "sample"], default="class")
    p.add_argument("--batch-size", type=int, default=65536, help="rows streamed per update")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--metrics", default=None, metavar="KEYS",
                   help="comma-separated subset to compute, e.g. nc1,nc2_equiangular (default: all; "
                        "ncc_mismatch and nc3/unc3/nc3_cos_mean need --weights). Skipping the pair metrics "
                        "(cdnv, gnc2, gnc2_mean, nc2_maxangle) skips the O(C^2 d) pair pass")


@command("collapse", "neural-collapse metrics (NC1..NC4, CDNV, GNC2, UNC3) from saved features and labels",
         arguments=_collapse_arguments)
def cmd_collapse(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from etfkern.collapse import CollapseMeter

    device = _device(args.device, default="cuda" if torch.cuda.is_available() else "cpu")
    if args.json:
        _output_file(args.json, "--json")
    feats = _load_tensor(args.features, "features")
    labels = _load_tensor(args.labels, "labels")
    if feats.dim() != 2:
        raise UsageError(f"--features must be (N, d), got shape {tuple(feats.shape)}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0] or labels.is_floating_point() or labels.is_complex():
        raise UsageError(f"--labels must be ({feats.shape[0]},) integers, got {tuple(labels.shape)} {labels.dtype}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.min_count < 1:
        raise UsageError(f"--min-count must be at least 1, got {args.min_count}")
    labels = labels.long()
    kept = labels != args.ignore_index
    if args.num_classes is not None:
        num_classes = args.num_classes
    else:
        num_classes = int(labels[kept].max()) + 1 if bool(kept.any()) else 0
    if num_classes < 2:
        raise UsageError(f"--num-classes must be at least 2, got {num_classes}")
    weights = _load_tensor(args.weights, "weights") if args.weights else None
    if weights is not None and tuple(weights.shape) != (num_classes, feats.shape[1]):
        raise UsageError(f"--weights must be ({num_classes}, {feats.shape[1]}), got {tuple(weights.shape)}")
    wanted = None
    if args.metrics is not None:
        wanted = [key.strip() for key in args.metrics.split(",") if key.strip()]
        if not wanted:
            raise UsageError("--metrics must name at least one metric")
        if "ncc_mismatch" in wanted and weights is None:
            raise UsageError("--metrics ncc_mismatch needs --weights")
    try:
        meter = CollapseMeter(num_classes, feats.shape[1], global_mean=args.global_mean, device=device,
                              ignore_index=args.ignore_index, min_count=args.min_count)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        for i in tqdm(range(0, feats.shape[0], args.batch_size), desc="streaming", unit="batch",
                      disable=not sys.stderr.isatty()):
            meter.update(feats[i:i + args.batch_size].to(device), labels[i:i + args.batch_size].to(device))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    w = weights.to(device) if weights is not None else None
    meter_keys = None if wanted is None else [key for key in wanted if key != "ncc_mismatch"]
    try:
        metrics = meter.compute(weights=w, metrics=meter_keys)
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}" if wanted is not None else str(exc)) from exc
    if w is not None and (wanted is None or "ncc_mismatch" in wanted):
        rows = feats if bool(kept.all()) else feats[kept]  # NC4 over the rows kept
        metrics["ncc_mismatch"] = meter.ncc_mismatch(rows.to(device), w)
    for key, value in metrics.items():
        print(f"{key:<20} {value:.6g}" if isinstance(value, float) else f"{key:<20} {value}")
    if args.json:
        record = dict(metrics)
        if args.min_count > 1:
            record["excluded_classes"] = meter.excluded_classes().tolist()
        try:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
        except OSError as exc:
            raise UsageError(f"--json {args.json!r}: {exc}") from None
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
def _bank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", "-C", type=int, help="number of classes C (>= 2)")
    p.add_argument("--dim", "-d", type=int, help="dimension d (>= 1)")
    p.add_argument("--kind", choices=("simplex", "ebv", "sparse"), default="ebv",
                   help="simplex ETF (C <= d+1), EBV (minimal max |cos|), or FedLoGe sparse ETF (default ebv)")
    p.add_argument("--method", choices=("auto", "optimize", "kerdock"), default="auto", help="EBV method")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (ebv optimize / sparse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.6, help="fraction of exact zeros for --kind sparse")
    p.add_argument("--device", default=None, help="torch device to generate on (default cpu)")
    p.add_argument("-o", "--output", help="write the bank to this .safetensors file")
    p.add_argument("--inspect", metavar="PATH", help="print the stored metadata and fresh stats of a saved bank")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _print_stats(stats: dict, as_json: bool, extra: dict) -> None:
    if as_json:
        print(json.dumps({**extra, "stats": stats}, indent=2, default=str))
        return
    for k, v in extra.items():
        print(f"{k}: {v}")
    if stats["welch_bound"] > 0:
        print(f"max|cos| {stats['max_abs_cos']:.6f}  ({stats['max_abs_cos'] / stats['welch_bound']:.4f} x Welch "
              f"{stats['welch_bound']:.6f})")
    else:  # C <= d: orthogonal rows are possible, the Welch bound is 0 and a ratio means nothing
        print(f"max|cos| {stats['max_abs_cos']:.6f}  (Welch bound 0: C <= d allows orthogonal rows)")
    print(f"mean|cos| {stats['mean_abs_cos']:.6f}  p99.9|cos| {stats['p999_abs_cos']:.6f}  "
          f"max norm error {stats['max_norm_error']:.3g}")


@command("bank", "generate a classifier bank (simplex / EBV / sparse ETF), print its stats, save it; "
         "or --inspect a saved one", arguments=_bank_arguments)
def cmd_bank(args: argparse.Namespace) -> int:
    import os
    import time

    from etfkern import banks

    device = _device(args.device)
    if args.inspect:
        if os.path.isdir(args.inspect):
            raise UsageError(f"--inspect {args.inspect!r} is a directory; give a .safetensors file")
        if not os.path.isfile(args.inspect):
            raise UsageError(f"--inspect: no such file {args.inspect!r}")
        try:
            bank, meta = banks.load_bank(args.inspect, device=device)
            stats = banks.bank_stats(bank)
        except ValueError as exc:
            raise UsageError(f"--inspect {args.inspect!r}: {exc}") from None
        _print_stats(stats, args.json, {"path": args.inspect, "shape": list(bank.shape), "dtype": str(bank.dtype),
                                        "metadata": {k: v for k, v in meta.items() if k != "stats"}})
        return EXIT_OK
    if args.classes is None or args.dim is None:
        raise UsageError("--classes and --dim are required (or --inspect PATH)")
    if args.output:
        _output_file(args.output, "-o")
    t0 = time.perf_counter()
    try:
        if args.kind == "simplex":
            bank = banks.simplex_etf(args.classes, args.dim, seed=args.seed, device=device)
            meta = {"kind": "simplex", "seed": args.seed}
        elif args.kind == "sparse":
            kw = {} if args.steps is None else {"steps": args.steps}
            bank = banks.sparse_etf(args.classes, args.dim, sparsity=args.sparsity, seed=args.seed,
                                    device=device, **kw)
            meta = {"kind": "sparse", "seed": args.seed, "sparsity": args.sparsity}
        else:
            kw = {} if args.steps is None else {"steps": args.steps}
            bank = banks.ebv_bank(args.classes, args.dim, seed=args.seed, method=args.method, device=device,
                                  **kw)
            meta = {"kind": "ebv", "seed": args.seed, "method": args.method}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    stats = banks.bank_stats(bank, progress=sys.stderr.isatty())  # one line per pass (minutes at C ~ 100k on CPU)
    t2 = time.perf_counter()
    if args.output:
        try:
            banks.save_bank(args.output, bank, stats=stats, **meta)
        except (OSError, ValueError) as exc:
            raise UsageError(f"-o {args.output!r}: {exc}") from None
    # "seconds" is the whole command's work (it used to be the generation alone: 0.791 s of a 26 s run)
    _print_stats(stats, args.json, {"kind": meta["kind"], "shape": list(bank.shape),
                                    "seconds": round(time.perf_counter() - t0, 3),
                                    "generate_seconds": round(t1 - t0, 3), "stats_seconds": round(t2 - t1, 3),
                                    **({"saved": args.output} if args.output else {})})
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("parts", nargs="*", help="families to run (default: all), e.g. spherical msam")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU minutes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="result JSON path (default bench/results/<device>-<date>[-quick].json)")
    p.add_argument("--report", default=None, metavar="MD",
                   help="markdown report path; its charts go to charts/ next to it (default bench/REPORT.md)")


@command("bench", "run the benchmark suite (or some families): results JSON, bench/REPORT.md and charts",
         arguments=_bench_arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run_all.py")
    if not os.path.exists(script):
        raise UsageError("the benchmarks ship with the source checkout (bench/run_all.py not found next to etfkern/)")
    _device(args.device)
    cmd = [sys.executable, script] + (["--quick"] if args.quick else []) + (["--only", ",".join(args.parts)]
                                                                            if args.parts else [])
    if args.device:
        cmd += ["--device", args.device]
    if args.out:
        cmd += ["--out", args.out]
    if args.report:
        cmd += ["--report", args.report]
    return subprocess.call(cmd)


# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etfkern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    from etfkern._core.backend import BackendUnavailableError, requested

    try:
        if args.command != "info":  # info reports a bad ETFKERN_BACKEND itself
            try:
                requested()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        return args._run(args)
    except BackendUnavailableError as exc:  # ETFKERN_BACKEND / use_backend asked for one that cannot run here
        print(f"etfkern {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"etfkern {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
