"""The Gradio demo: caption an uploaded image, ask about it, see attention maps, search a folder by text."""
