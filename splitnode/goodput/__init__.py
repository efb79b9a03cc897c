"""Serving benchmarks: workloads shaped like real traces, open- and closed-loop load, SLOs and
goodput (`splitnode bench serve`)."""
