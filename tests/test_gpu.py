"""GPU paths of the trainer, run on CUDA (skipped without it, see conftest.py). `make gpu-check` runs these
too, with the figures; the pipeline GPU tests live in test_pipelines.py / test_ffcv.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import Batch
from pipelines.spec import SPEC_PRESETS
from trainer import TrainConfig
from trainer.schedule import Schedule
from trainer.train import Distributed, Training

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.parametrize("arch, patch", [("vit_t", 8), ("resnet18", None)])
def test_a_training_step_on_cuda_makes_no_host_sync(tmp_path, arch, patch):
    """set_sync_debug_mode("error") raises on any device->host sync: a non-logging step must make none
    (bf16 autocast, fused AdamW with the device-side non-finite skip, channels_last for the ResNet)."""
    spec = SPEC_PRESETS["cpu-small"]
    cfg = TrainConfig(arch=arch, patch_size=patch, batch_size=16, proj_dim=64, hidden_dim=256, num_slices=128,
                      spec=spec, out=str(tmp_path), steps=10)
    device = torch.device("cuda", 0)
    training = Training(cfg, Distributed(0, 1, device, False), num_classes=10, schedule=Schedule(10, 2))
    training.distribute(0)
    g = torch.Generator(device=device).manual_seed(0)
    batch = Batch(torch.randn(16, 2, 3, 64, 64, device=device, generator=g),
                  torch.randn(16, 6, 3, 32, 32, device=device, generator=g),
                  torch.randint(0, 10, (16,), device=device, generator=g))
    training.step(lambda: batch)  # lazy state (optimizer, cuDNN plans) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            training.step(lambda: batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    figures, bad, _ = training.read_window()
    assert bad == 0 and all(torch.isfinite(torch.tensor(figures)))


def test_gpu_check_without_cuda_says_so_and_succeeds():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: `make gpu-check` runs the real check")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no CUDA device: nothing to check"
