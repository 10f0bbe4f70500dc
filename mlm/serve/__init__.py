"""``mlm serve``: the model as an HTTP service with dynamic batching, on LitServe (FastAPI and uvicorn underneath)."""
