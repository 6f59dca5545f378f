"""Stage 6, measuring a model: test losses, samples and grids, FID/IS/KID, the label histogram,
CGAN-MBL's balancing, and where a number was measured (commit, hardware).
"""
