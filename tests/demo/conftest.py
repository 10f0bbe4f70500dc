"""Demo tests: gradio is imported before any :class:`~mlm.demo.service.DemoService` sets GRADIO_TEMP_DIR."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def gradio_imported_first():
    """Import gradio with GRADIO_TEMP_DIR as the session found it.

    Some gradio modules read the variable once, when imported, and every launch makes a folder under that value.
    Imported while one test's service had pointed it at its own temporary folder, gradio would re-create that
    (deleted) folder in each later test that launches an app.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:  # the service tests run without it; the app tests import it themselves and fail
        pass
