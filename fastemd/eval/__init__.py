"""Evaluation of a pretrained backbone (SPEC section 7): `fastemd eval probe` (`probe.py`)."""
