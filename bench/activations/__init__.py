"""Activations at one hook: `ActivationSet` (`set`) and their extraction, cached on disk
(`extract`)."""

from bench.activations.extraction import bos_offset, extract, padded_batches, tokenize
from bench.activations.set import ActivationSet

__all__ = ["ActivationSet", "bos_offset", "extract", "padded_batches", "tokenize"]
