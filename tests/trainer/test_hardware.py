"""trainer/hardware.py: the bf16 peak MFU divides by, per device name (torch.cuda's name stood in for: no GPU)."""

from __future__ import annotations

import pytest
import torch

from trainer.hardware import device_peak_flops


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
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_follows_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak
    assert device_peak_flops(torch.device("cpu")) is None
