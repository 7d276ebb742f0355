"""The library service: the one door the faces (CLI, app, summaries) go through."""
