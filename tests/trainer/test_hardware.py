"""trainer/hardware.py: the bf16 peak MFU divides by, per device name (torch.cuda's name stood in for: no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.hardware import device_peak_flops, peak_memory_bytes


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),  # not the SXM peak: MFU would read 24% low
        ("NVIDIA H100 NVL", 835e12),  # nor here: with the SXM peak, MFU would read 16% low
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GB200", 2.5e15),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A800-SXM4-80GB", 312e12),  # the A100's export variant: the same tensor cores
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_follows_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak
    assert device_peak_flops(torch.device("cpu")) is None


def test_the_cpu_peak_is_the_processes_peak_resident_set_in_bytes():
    """On CPU: the kernel's high-water mark of this process's resident set (VmHWM, in kB), in bytes."""
    buffer = torch.ones(32 * 2**20, dtype=torch.uint8)  # 32 MiB touched: the peak is at least this much
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_bytes = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    peak = peak_memory_bytes(torch.device("cpu"))
    assert hwm_bytes >= buffer.numel()
    assert peak == pytest.approx(hwm_bytes, rel=0.1)  # two accountings of one high-water mark, a few pages apart


def test_the_cuda_peak_is_torchs_peak_allocated_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: torch's peak of allocated bytes (its counters stood in for: no GPU), not the current allocation."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    assert peak_memory_bytes(torch.device("cuda", 0)) == 3 * 2**30
