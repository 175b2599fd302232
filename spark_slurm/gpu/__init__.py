"""GPU backends: one protocol, an NVML implementation and a simulated fleet."""

from spark_slurm.gpu.backend import (
    DeviceInfo,
    GpuBackend,
    PowerLimits,
    Sample,
    open_backend,
    reason_names,
)
from spark_slurm.gpu.mapping import map_slurm_indices
from spark_slurm.gpu.sampler import SamplerStats, TelemetrySampler

__all__ = [
    "DeviceInfo",
    "GpuBackend",
    "PowerLimits",
    "Sample",
    "SamplerStats",
    "TelemetrySampler",
    "map_slurm_indices",
    "open_backend",
    "reason_names",
]
