"""sbatch templates (data files; a package only so that setuptools ships them with ``slurm``)."""
