"""Speed and memory figures for mailflow, each printed beside its baseline.

Run them with ``.venv/bin/python benchmarks/run.py`` (or ``./make.sh bench``).
These are not tests: pytest never collects them (no ``test_*`` names, and
``testpaths`` is ``tests``), and they report targets without gating on them.
"""
