"""Flax modules: T5 encoder/decoder (and, built on it, the multimodal models)."""
