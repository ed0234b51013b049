"""Benchmarks of notebook_launcher side by side with the launchers people use instead.

Run ``python benchmarks/run_all.py`` (see README.md). Not part of the test suite.
"""
