"""Offline analysis of HDF5 traces.

It reads traces through the schema in ``docs/trace-schema.md`` only and never imports the
runtime (DESIGN.md §2): ``open`` reads one trace into pandas, ``open_many`` a sweep of them,
``summarize`` / ``summary_table`` compute each run's headline numbers.
"""

from analysis.read import Run, Runs, TraceError, open, open_many
from analysis.summary import summarize, summary_table

__all__ = ["Run", "Runs", "TraceError", "open", "open_many", "summarize", "summary_table"]
