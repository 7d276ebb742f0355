"""The synthetic world, its questions, and the demo model's tokenizer and builders (no training)."""
