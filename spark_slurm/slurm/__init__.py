"""The scheduler side: job context, GRES parsing, and one runner for Slurm commands."""

from spark_slurm.slurm.admin_token import AdminToken, parse_admin_token
from spark_slurm.slurm.context import (
    JobContext,
    JobContextSource,
    build_context,
    open_context_source,
)
from spark_slurm.slurm.gres import GresAlloc, GresRequest, parse_gres, parse_gres_alloc
from spark_slurm.slurm.runner import Runner, RunResult, SubprocessRunner

__all__ = [
    "AdminToken", "GresAlloc", "GresRequest", "JobContext", "JobContextSource", "RunResult",
    "Runner", "SubprocessRunner", "build_context", "open_context_source", "parse_admin_token",
    "parse_gres", "parse_gres_alloc",
]
