"""The admin files spark-slurm ships (Slurm plugin and wrappers, units, dashboards,
Prometheus config and rules, example configs, docs) and their installation."""

from spark_slurm.files.install import Written, install, plan
from spark_slurm.files.layout import Layout, render
from spark_slurm.files.shipped import CATALOGUE, Entry, catalogue, data_root

__all__ = ["CATALOGUE", "Entry", "Layout", "Written", "catalogue", "data_root", "install",
           "plan", "render"]
