"""Coverage-guided fuzz targets (atheris) for every reader; see harness.py and bench/RESULTS.md."""
