"""Peak dense bf16 throughput of known accelerators, for MFU. Unknown devices (and CPUs) get none."""

from __future__ import annotations

import torch

# Dense (non-sparse) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s: half the "with sparsity"
# figure they print. Matched by substring of the device name, first match wins, so each variant comes before
# the name it contains: "NVIDIA H100 PCIe" (1513 with sparsity) and "NVIDIA H100 NVL" (1671) before the SXM
# H100, "H200 NVL" before "H200" (which also matches GH200, the SXM peak), "GB200" (per GPU) before "B200".
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "A100": 312e12,
    "A800": 312e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The peak of `device` (the first PEAK_BF16_FLOPS key in its name), None for a CPU or an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
