"""The numbers the EMD reference (`emd.py`) and the Triton kernels (`emd_triton.py`) share, so
that both compute the same function and neither imports the other for them."""

EPS = 1e-6  # a feature vector with norm <= EPS is the zero vector (no direction, no gradient)
CROSS_FLOOR = 1e-3  # "cross" weights: relu(.) + CROSS_FLOOR before normalising
