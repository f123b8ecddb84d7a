"""Bounded, validating readers for model file formats; none of them trusts a length, count or offset."""
