"""Evaluation helpers over RecBole's own metrics: slices of evaluated users (head/tail, short/long, cold)."""
