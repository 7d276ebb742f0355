"""`streamlit run streamlit_app.py`: the vidmini app. The page is `vidmini/ui/main.py`; its upload and media routes
come from `vidmini/ui/routes.py` (`st.App` is called here, in the file `streamlit run` is given: that is how it
knows the file is an app, not a script). With `$VIDMINI_API_KEY_FILE` set, the page asks for a key."""

import streamlit as st

from vidmini.ui.app import PAGE
from vidmini.ui.routes import make_routes

app = st.App(str(PAGE), routes=make_routes())
