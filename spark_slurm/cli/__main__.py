"""`python -m spark_slurm.cli` is `sparkctl`."""

from spark_slurm.cli import main

main()
