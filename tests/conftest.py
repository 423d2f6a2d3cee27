"""Shared test fixtures: small random models and their checkpoints (nothing is downloaded)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# Tests run on CPU with two threads, as on CI and the 2-core dev machine; peers log noisily.
torch.set_num_threads(min(2, os.cpu_count() or 1))
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine (OpenMP threads spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    from clip.config import get_config
    from clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(get_config("ViT-Tiny/8@32px")).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """A tiny model saved in this project's checkpoint format; returns its path."""
    from clip.loading import save_model

    path = tmp_path / "tiny.pt"
    save_model(tiny_model, path)
    return path
