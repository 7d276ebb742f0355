"""FAISS indexes over per-frame embeddings and moment search (see the index issue)."""
