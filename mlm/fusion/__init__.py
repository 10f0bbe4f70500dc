"""Fusion of the two modalities: hierarchical pooling into the shared space and the cross-modal decoder."""
