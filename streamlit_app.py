"""`streamlit run streamlit_app.py`: the vidmini app. The page is `vidmini/app/ui_main.py`; this file adds the
streaming upload and media routes beside Streamlit's own (see vidmini/app/server.py)."""

import streamlit as st

from vidmini.app.server import make_routes

app = st.App("vidmini/app/ui_main.py", routes=make_routes())
