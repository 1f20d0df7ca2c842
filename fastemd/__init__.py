"""fastemd: Self-EMD self-supervised pretraining of detection backbones (arXiv 2011.13677)."""

__version__ = "0.1.0"
