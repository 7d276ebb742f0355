"""`vidmini serve`: the HTTP API other programs use (OpenAI-compatible chat, the library over REST)."""
