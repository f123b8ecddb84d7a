"""Measured comparisons; each benchmark writes its results and the exact command that produced them."""
