"""The OpenAI-compatible HTTP server: server.py (FastAPI app and main), scheduler.py (FIFO queue, the
worker thread that batches requests into the one Session), api_schema.py (request bodies, OpenAI's error
shape), limits.py (the body-size limit), metrics.py (Prometheus). The chat page is
mixtral_lite/static/chat.html (package data).
"""
