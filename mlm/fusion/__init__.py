"""Fusion of the two modalities: the cross-modal decoder that reads image tokens while it writes text."""
