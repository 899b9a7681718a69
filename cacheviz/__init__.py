"""cacheviz: the cache model of Orhan (NeurIPS 2018) as a library, a CLI and an app.

The engine never imports Streamlit; only `cacheviz/ui.py` and `pages/` do.
"""

__version__ = "0.1.0"
