"""`streamlit run streamlit_app.py`: the vidmini app. The page is `vidmini/ui/main.py`; this file adds the
streaming upload and media routes beside Streamlit's own (see vidmini/ui/routes.py)."""

import streamlit as st

from vidmini.ui.routes import make_routes

app = st.App("vidmini/ui/main.py", routes=make_routes())
