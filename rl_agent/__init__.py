"""Gymnasium environments for FedStitch's aggregation decision and their agents.

Filled in by the FedStitch issue; it may import ``emulator``, never the reverse.
"""
