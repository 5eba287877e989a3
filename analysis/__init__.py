"""Offline analysis of HDF5 traces.

Filled in by the analysis issue; it reads traces through the schema in ``docs/trace-schema.md``
only and never imports the runtime.
"""
