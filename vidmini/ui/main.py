"""The Streamlit page script (thin: everything is in vidmini.ui.page over the service)."""

from vidmini.ui.page import main

main()
