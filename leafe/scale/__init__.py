"""Scaling out: envs on Ray workers (workers) and multi-process training under accelerate (launch)."""
