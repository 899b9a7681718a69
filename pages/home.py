"""Home: the method in brief, the current setup, building the cache, and its results."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

st.title("Cache models: a network plus a memory of its training set")

with st.container(border=True):
    st.markdown(
        "Orhan (NeurIPS 2018): store the activations of chosen layers for every training image as "
        "**keys** and their labels as **values**. At test time the query's activations vote through "
        "a softmax over similarities, and that vote is mixed with the network's own output."
    )
    c1, c2, c3 = st.columns(3)
    with c1:
        st.caption("1 · keys: unit-length layer activations φ")
        st.latex(r"k_i = \frac{\phi(x_i)}{\lVert \phi(x_i) \rVert},\qquad v_i = \mathrm{onehot}(y_i)")
    with c2:
        st.caption("2 · the cache's vote, sharpness θ")
        st.latex(r"p_{\mathrm{mem}}(y \mid x) = \mathrm{softmax}\!\left(\theta\, q K^{\top}\right) V")
    with c3:
        st.caption("3 · the mixture, weight λ")
        st.latex(r"p = (1-\lambda)\, p_{\mathrm{net}} + \lambda\, p_{\mathrm{mem}}")
    st.caption("θ and λ are chosen on a validation split by a grid search; test accuracy is measured on the rest.")

with ui.guard("home"):
    choice = ui.current()
    s = choice.setup
    st.subheader("Setup")
    n = "all" if s.train_limit is None else f"{s.train_limit:,}"
    st.markdown(
        f"**{ui.DATASETS.get(s.dataset, s.dataset)}** · model **{s.model}** · keys **{', '.join(choice.layers) or '—'}**"
        f" · cache: {n} training items{' + flips' if s.flip else ''} · device {choice.device} · preset *{choice.preset}*"
    )
    st.caption(f"Data directory: `{choice.data_dir.resolve()}` — built caches and results are kept there.")

    result = ui.build_panel(choice, key="home")
    if result is not None:
        st.subheader("Results on the test split")
        base, cache, only = result["baseline_acc"], result["cache_acc"], result["cache_only_acc"]
        m = st.columns(4)
        m[0].metric("Network alone", f"{base:.2%}", border=True)
        for col, label, acc in ((m[1], "Cache model", cache), (m[2], "Cache only (λ = 1)", only)):
            gain = (acc - base) * 100
            col.metric(label, f"{acc:.2%}", delta=f"{gain:+.2f} points vs the network",
                       delta_color="normal" if abs(gain) > 1e-9 else "off",
                       delta_arrow="auto" if abs(gain) > 1e-9 else "off", border=True)
        m[3].metric(f"k-NN vote (k = {result['knn_k']})", f"{result['knn_acc']:.2%}", border=True)
        m = st.columns(4)
        m[0].metric("θ (tuned)", f"{result['theta']:g}", help=f"cache-only: θ = {result['theta_cache_only']:g}")
        m[1].metric("λ (tuned)", f"{result['lam']:g}")
        m[2].metric("Fixed by the cache", result["n_fixed"], help="test items wrong for the network, right with the cache")
        m[3].metric("Broken by the cache", result["n_broken"], help="test items right for the network, wrong with the cache")
        grid = result["grid"]
        if max(len(grid["thetas"]), len(grid["lams"])) <= plots.GRID_TABLE_MAX:
            st.html(plots.grid_table_html(result))
        else:
            st.plotly_chart(plots.fig_grid(result), key="grid")
        if result.get("theta_on_edge") or result.get("theta_cache_only_on_edge"):
            hi = grid["thetas"][-1]
            st.warning(f"The tuned θ is on the grid's edge ({grid['thetas'][0]:g} … {hi:g}): the best θ may lie "
                       f"beyond it. The command line widens the grid: `python -m cacheviz evaluate … "
                       f"--theta-max {2 * hi:g}`.", icon=":material/border_outer:")
        st.caption(
            f"{result['n_test']:,} test items; θ and λ tuned on {result['n_val']:,} validation items from the "
            f"{result['val_part']} set; cache of {result['n_cache']:,} items with {result['key_dim']:,}-d keys "
            f"({', '.join(result['layers'])}); built in {result['seconds']:.1f} s on {result['device']}."
        )
        st.page_link(Path(__file__).with_name("neighbours.py"), label="Explore the neighbours of any image →", icon=":material/image_search:")
