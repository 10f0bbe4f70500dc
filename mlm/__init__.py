"""mlm: one shared-weight MLA transformer for images and text, with a cross-modal decoder."""

__version__ = "0.1.0"
