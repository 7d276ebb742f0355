"""LLaVA-Mini engine: model pieces, checkpoint loading, the ingest/question cache split, generation.

Knows nothing of files beyond checkpoints, nor of videos or UI. Import the modules themselves (this package
imports nothing, so that light commands do not pay for torch and transformers).
"""
