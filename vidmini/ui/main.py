"""The Streamlit page script (thin: everything is in app.ui over app.library)."""

from vidmini.ui.page import main

main()
