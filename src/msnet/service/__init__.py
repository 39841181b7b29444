"""HTTP service (FastAPI) and its web page."""
