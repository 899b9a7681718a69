"""Navigation and the entry script's duties: page config, the pages in sections, and the
guard against Streamlit's pages/ compatibility mode."""
from __future__ import annotations

import threading
from pathlib import Path

import streamlit as st


def page_config() -> None:
    st.set_page_config(page_title="cacheviz · cache models", page_icon=":material/memory:", layout="wide")


# Streamlit keeps a compatibility mode for apps with a pages/ folder beside the entry script:
# until some run has called st.navigation, a request for a page URL (say the first visitor of a
# freshly started server opens /neighbours) runs that page file ALONE, without app.py, so no
# sidebar, and the mode sticks for the whole process. Pages therefore check that app.py ran in
# this script run and, when it did not, run it (its st.navigation then ends that mode).
_RUN = threading.local()


def entrypoint_started() -> None:
    """Called first thing by app.py in every script run."""
    _RUN.entry = True


def ensure_entrypoint(app_path: str | Path) -> None:
    """Called first thing by every page: run app.py (which runs this page) if it did not run."""
    ran = getattr(_RUN, "entry", False)
    _RUN.entry = False
    if ran:
        return
    import runpy

    runpy.run_path(str(app_path), run_name="__main__")
    st.stop()


def pages(root: str | Path) -> dict[str, list]:
    """The app's pages, grouped: the interactive explorer, the paper's experiments and its robustness results."""
    pg = Path(root) / "pages"
    return {
        "Explore": [
            st.Page(pg / "home.py", title="Cache model", icon=":material/memory:", default=True),
            st.Page(pg / "neighbours.py", title="Neighbours", icon=":material/image_search:"),
            st.Page(pg / "knowledge.py", title="Knowledge store", icon=":material/database:"),
        ],
        "The paper's experiments": [
            st.Page(pg / "layers.py", title="Which layer (Fig. 2)", icon=":material/stacked_line_chart:"),
            st.Page(pg / "sizes.py", title="Cache size (Fig. 3)", icon=":material/trending_up:"),
            st.Page(pg / "table1.py", title="Table 1", icon=":material/table_chart:"),
        ],
        "Robustness": [
            st.Page(pg / "robustness.py", title="Robustness lab (Tables 2–4)", icon=":material/shield:"),
            st.Page(pg / "resists.py", title="Why it resists", icon=":material/psychology:"),
            st.Page(pg / "jacobian.py", title="Jacobians (Fig. 4)", icon=":material/grain:"),
        ],
        "Speed": [
            st.Page(pg / "early.py", title="Answer early", icon=":material/bolt:"),
        ],
    }
