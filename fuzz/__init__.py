"""Fuzzing: hostile-input generators, the checks every input must pass, coverage-guided
harnesses (atheris) and the hostile-traffic run against a live `collector serve`.

`make fuzz` runs `fuzz/run.py`; docs/robustness.md reports what it found.
"""
