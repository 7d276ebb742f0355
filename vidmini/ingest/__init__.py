"""Media ingest: turning image and video files into frames for the engine."""
