"""Benchmarks of stockade's backends and egress gateway against baselines and peers, in the same run.

Run ``python -m bench --help``; the published figures are in docs/benchmarks.md. Kept outside ``src/``: it is
a tool of the project, not part of the installed package.
"""
