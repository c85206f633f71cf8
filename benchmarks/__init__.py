"""Benchmarks of infotrace (run as modules, e.g. ``python -m benchmarks.speed``)."""
