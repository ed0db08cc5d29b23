"""`./launch.sh serve`: an OpenAI-compatible server with continuous batching, and `load()`.

app (routes), protocol (requests in, response bodies out), job (one running request),
scheduler (the decoding thread), loader (a model folder or MLflow URI -> a loaded model).
"""
