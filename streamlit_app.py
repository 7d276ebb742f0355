"""`streamlit run streamlit_app.py`: the vidmini app. The page is `app/ui_main.py`; this file adds the
streaming upload and media routes beside Streamlit's own (see app/server.py)."""

import streamlit as st

from app.server import make_routes

app = st.App("app/ui_main.py", routes=make_routes())
