"""The Streamlit app: the page and its HTTP routes (upload, media)."""
