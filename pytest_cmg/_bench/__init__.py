"""Benchmarks of the download core against the SDK, aria2c and the machine's ceilings.

``python -m pytest_cmg bench`` and ``pytest --cmg-bench`` run the same :class:`~._runner.Bench`:
one in-memory Azurite, blobs uploaded once, every case run once per round in a shuffled order,
outputs deleted before each run and verified after it (docs/benchmarks.md has the method). Nothing
here is imported by the plugin unless a benchmark is asked for.
"""
