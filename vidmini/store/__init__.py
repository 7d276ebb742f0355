"""One video's store on disk, the catalogue of stores, and opening a session from a store."""
