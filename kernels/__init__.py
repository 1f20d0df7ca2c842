"""GPU kernels, each beside its pure-PyTorch reference."""

from .emd import emd_similarity, emd_similarity_reference

__all__ = ["emd_similarity", "emd_similarity_reference"]
