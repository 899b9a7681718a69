"""cacheviz app: `streamlit run app.py`.

Page config, the shared sidebar (the setup, from `cacheviz.ui`), and navigation over pages/.
The sidebar is drawn here, in the entry script, so its widgets keep their values across pages.
"""
from pathlib import Path

import streamlit as st

from cacheviz import ui

HERE = Path(__file__).resolve().parent

ui.entrypoint_started()
ui.page_config()
page = st.navigation(ui.pages(HERE))  # every page, in sections: see ui.pages
with ui.guard("sidebar"):
    ui.sidebar()
page.run()
