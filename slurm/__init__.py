"""Slurm: sbatch scripts rendered from a template, submitted, and swept as job arrays; requeue + resume.

``fedemu slurm render|submit|sweep`` (``slurm/commands.py``); ``slurm/local_cluster.sh`` starts a
one-node cluster for tests. May import ``emulator`` (config loading and validation), never ``rl_agent``
or ``analysis``.
"""
