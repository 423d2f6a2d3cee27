"""Data sets shipped with clip."""
