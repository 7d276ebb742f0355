"""The app as an ASGI application: the Streamlit page (`vidmini/ui/main.py`) with the streaming upload and media
routes beside Streamlit's own. `streamlit run streamlit_app.py` serves it alone; `vidmini serve --app` serves it
at `/` of the HTTP API's process, over the same Library."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from vidmini.ui.routes import make_routes

PAGE = Path(__file__).resolve().parent / "main.py"
KEY_FILE_ENV = "VIDMINI_API_KEY_FILE"  # set: the page asks for one of its keys before showing anything


def make_app() -> st.App:
    return st.App(str(PAGE), routes=make_routes())
