"""Benchmarks of infotrace (run as modules, e.g. ``python -m benchmarks.speed``)."""

__all__ = ["common", "live_server", "load", "quality", "speed"]
