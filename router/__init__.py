"""The AppendRouter: an OpenAI-compatible FastAPI app in front of SGLang prefill/decode servers (see app.py)."""
