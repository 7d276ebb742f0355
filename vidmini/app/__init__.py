"""The library service, CLI and UI pieces: the one API that the CLI and the Streamlit app both call."""
