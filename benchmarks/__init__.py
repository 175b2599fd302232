"""spark-slurm performance suite: figures beside same-run baselines, never timed tests."""
