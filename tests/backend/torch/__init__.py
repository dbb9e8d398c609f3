"""Tests of the PyTorch backend."""
