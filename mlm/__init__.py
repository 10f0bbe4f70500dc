"""mlm: one shared-weight MLA transformer for images and text, with a cross-modal decoder."""

__version__ = "0.1.0"

__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "list_models"]


def __getattr__(name: str):
    """The open_clip-style factory functions, imported on first use (``import mlm`` stays light for the CLI)."""
    if name in __all__:
        from mlm import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'mlm' has no attribute {name!r}")
