"""Training of the shipped demo model (`make model`: `python -m research.training.train`)."""
