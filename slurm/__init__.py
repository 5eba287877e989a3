"""sbatch templates, render / submit / sweep, requeue and resume.

Filled in by the Slurm issue; it may import ``emulator``.
"""
