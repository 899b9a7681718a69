"""cacheviz app: `streamlit run app.py`.

Page config, the shared sidebar (the setup and the teacher sign-in, from `cacheviz.ui`), and
navigation over pages/.
The sidebar is drawn here, in the entry script, so its widgets keep their values across pages.
"""
from pathlib import Path

import streamlit as st

from cacheviz import ui

HERE = Path(__file__).resolve().parent

ui.entrypoint_started()
ui.announce()  # once per server process: whether the teacher role is on (worker processes never run this)
ui.page_config()
page = st.navigation(ui.pages(HERE))  # every page, in sections: see ui.pages
with ui.guard("sidebar"):
    ui.sidebar()
with ui.guard("role"):
    # a guard of its own: a setup that fails to draw must not hide the teacher's sign-in
    ui.role_sidebar()
page.run()
