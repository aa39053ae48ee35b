"""The examples run as documented (small settings): EBV training, the causal LM head, SGD vs MSAM, and the
torchrun tour."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_train_ebv_learns():
    spec = importlib.util.spec_from_file_location("train_ebv", os.path.join(EXAMPLES, "train_ebv.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # 2000 classes at d=64: the bank is a Kerdock subset (instant); data independent of the bank
    history = module.main(["--classes", "2000", "--dim", "64", "--epochs", "4", "--device", "cpu"])
    assert history["loss"][-1] < history["loss"][0]
    assert history["acc"][0] < 0.01 and history["acc"][-1] > 0.1  # chance is 5e-4


def test_train_lm_head_learns_with_sequence_features_and_learnable_tau():
    spec = importlib.util.spec_from_file_location("train_lm_head", os.path.join(EXAMPLES, "train_lm_head.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(["--steps", "100", "--log-every", "50", "--device", "cpu"])
    assert history["step"] == [0, 50, 100]
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["acc"][0] < 0.02 and history["acc"][-1] > 0.5  # chance 1/256, best possible 0.9
    assert history["tau"][-1] != history["tau"][0]  # the temperature is learned


def test_train_msam_runs():
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "train_msam.py"), "--steps", "60"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "msam" in out.stdout.lower() and "sgd" in out.stdout.lower()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_tour_under_torchrun(world):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.join(EXAMPLES, "distributed_tour.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"distributed tour on {world} ranks (gloo): all checks passed" in out.stdout
