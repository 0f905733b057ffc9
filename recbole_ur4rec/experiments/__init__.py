"""Experiments over runs: Ray Tune searches and their records, side-by-side comparisons and their reports."""
