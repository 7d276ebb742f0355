"""The `vidmini` command line."""
