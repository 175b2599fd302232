"""Site policy: YAML model with line/column errors, evaluation, and the Lua admission table."""

from spark_slurm.policy.lua import compile_lua
from spark_slurm.policy.model import (
    Decision,
    FacilitySettings,
    GpuSettings,
    Limit,
    PowerRequest,
    ThermalSettings,
)
from spark_slurm.policy.site import Policy, reload_policy

__all__ = [
    "Decision",
    "FacilitySettings",
    "GpuSettings",
    "Limit",
    "Policy",
    "PowerRequest",
    "ThermalSettings",
    "compile_lua",
    "reload_policy",
]
