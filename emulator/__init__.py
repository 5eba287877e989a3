"""fedemu's MPI runtime: config, comm, roles, data, algorithms, trace, CLI."""

__version__ = "0.1.0"
