"""Tensor parallelism's communication: the process group one model's ranks share (comm.py)."""
