"""Batch summaries: summarize, describe, output formats, and the batch runner (local or Ray)."""
