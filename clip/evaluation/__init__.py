"""Evaluation: zero-shot classification, image-text retrieval and linear probes.

Evaluators take encode functions or precomputed embeddings, never a trainer or a data loader of their
own choosing (`clip.evaluation.features.encode_images` turns a data set and an encode function into
features). Metrics are pure functions in `clip.evaluation.metrics`.
"""
