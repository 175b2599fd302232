"""spark-slurm: govern GPU power on Slurm clusters and prove every power action."""

__version__ = "0.1.0"
