"""Benchmarks of gid, each a module run from the repository root: ``python -m benchmarks.<name>`` (results and commands: docs/benchmarks.md)."""
