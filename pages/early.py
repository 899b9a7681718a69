"""Answer early: a cache inside the network answers before the last layers run."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
The cache can also buy **speed**: keys taken at an intermediate layer let a **truncated** network answer from
its nearest stored images (cache-only p_mem), skipping the remaining layers. A **gated** exit answers there only
when the cache is confident (max p_mem ≥ τ) and otherwise runs the rest of the network from that layer's output;
a **cascade** tries several exit layers in turn. Every time here is **measured** on this machine — the passes each
model really runs plus the cache lookup — against the full network timed beside it. The lookup grows with the
cache, so small caches (a few % of the training set, class-balanced) are where speed can be won.
"""

with ui.experiment_page("ea", "Answer early", INTRO) as choice:
    s = choice.setup
    offered, defaults = ui.early_layers(s.model)
    if not offered:
        st.warning(f"{s.model} cannot answer early here: its forward pass is not written as a chain of steps that "
                   "can stop and resume. Pick a CIFAR ResNet or the offline digits CNN in the sidebar.",
                   icon=":material/block:")
        st.stop()
    c1, c2 = st.columns([3, 2])
    layers = c1.multiselect("Exit layers", offered, default=defaults, key=f"ea_layers_{s.model}",
                            help="Where the pass may stop: the end of a block (ResNets) or a layer (digits CNN).")
    fractions_text = c2.text_input("Cache sizes (fractions of the training set)", "0.005, 0.025, 0.1, 1",
                                   key="ea_fractions")
    c3, c4, c5 = st.columns([3, 1, 1])
    taus_text = c3.text_input("Thresholds τ on max p_mem (gated exits)", "0.5, 0.8, 0.9, 0.95, 0.99", key="ea_taus")
    timing = int(c4.number_input("Timed images", min_value=10, max_value=10000, value=1000, step=100,
                                 key="ea_timing"))
    mix = c5.checkbox("Mix", key="ea_mix", help="Images that do not exit answer with the cache model's p (the "
                                                "paper's mixture with p_mem) instead of the network's p_net.")
    rows = None
    if not layers:
        st.info("Pick at least one exit layer.")
    else:
        study = ui.early_study(choice, layers, ui.parse_numbers(fractions_text, "cache sizes"),
                               ui.parse_numbers(taus_text, "thresholds"), mix, timing)
        rows = ui.study_panel(study, choice, key="ea", label="Measure the frontier",
                              note=ui.missing_data_note(choice), lock_key=ui.sweep_lock(choice))
    if rows:
        tau = st.select_slider("τ of the gated exits shown", options=list(study.taus), value=study.taus[len(study.taus) // 2],
                               key=f"ea_tau_{'_'.join(f'{t:g}' for t in study.taus)}")
        fig = plots.fig_early_frontier(rows, tau)
        st.plotly_chart(fig, key="ea_frontier")
        wins = ui.faster_within(rows)
        full = next(r for r in rows if r["mode"] == "full")
        if wins:
            w = wins[0]
            at_tau = "" if w["tau"] is None else f", τ = {w['tau']:g}"
            st.success(f"Faster than the network at most 1 point below it: **{w['mode']}** at {w['layer']} with a "
                       f"{100 * w['cache_fraction']:.3g}% cache{at_tau}: "
                       f"{100 * w['accuracy']:.1f}% against {100 * full['accuracy']:.1f}%, {w['speedup']:.2f}× the "
                       f"network's speed, faster in every timed round ({len(wins)} such configuration{'s' if len(wins) > 1 else ''} in all).")
        else:
            st.info(f"No configuration here is faster than the network ({full['ms_per_image']:.3g} ms per image) in "
                    f"every timed round at most 1 point below its {100 * full['accuracy']:.1f}%.")
        st.dataframe(ui.early_table(rows, tau), hide_index=True, key="ea_table")
        ui.export_buttons(fig, rows, f"early-{s.dataset}-{s.model}", key="ea_export")
        st.caption(f"The same numbers as `{ui.early_cli(study)}`. Times: median of {study.reps} runs on "
                   f"{rows[0]['timing_images']} test images, {rows[0]['device']}; accuracy on the "
                   f"{rows[0]['n_test']} images of the test part, θ tuned on validation per layer and cache size.")

    # -----------------------------------------------------------------------------------------
    st.header("Learned key networks")
    st.markdown("The *hash* networks of a student project on caching inside DNNs: a small CNN (six convolutions) trained to map an image straight into "
                "the cache's key space at one layer — first regressing the network's keys there, then fine-tuned "
                "on the labels with a triplet or an N-pair loss — so a query skips the network altogether and "
                "looks up the same cache.")
    k1, k2, k3, k4 = st.columns([2, 2, 2, 2])
    kn_layer = k1.selectbox("Teacher layer", offered, index=offered.index(ui.keynet_default(s.model))
                            if ui.keynet_default(s.model) in offered else 0, key=f"ea_kn_layer_{s.model}")
    kn_loss = k2.radio("Loss", ["triplet", "npair"], horizontal=True, key="ea_kn_loss")
    kn_frac = k3.number_input("Cache (fraction)", min_value=0.001, max_value=1.0, value=0.025, step=0.005,
                              format="%.3f", key="ea_kn_frac")
    kn_epochs = k4.text_input("Epochs (regression, metric)", "6, 3", key="ea_kn_epochs")
    epochs = ui.parse_numbers(kn_epochs, "epochs", int)
    if len(epochs) != 2:
        st.warning("Give two epoch counts: regression, then metric learning, e.g. 6, 3.")
        st.stop()
    kstudy = ui.keynet_study(choice, kn_layer, kn_loss, kn_frac, tuple(epochs))
    krows = ui.study_panel(kstudy, choice, key="ea_kn", label="Train the key network",
                           note="Trains once (on the GPU when there is one), then the stored network is reused.",
                           lock_key=ui.sweep_lock(choice))
    if krows:
        main_t, robust_t = ui.keynet_tables(krows)
        a, b = st.columns([3, 2])
        a.dataframe(main_t, hide_index=True, key="ea_kn_table")
        b.dataframe(robust_t, hide_index=True, key="ea_kn_robust")
        st.caption(f"Trained in {krows[0]['train_seconds']:g} s on {krows[0]['device']}. Robustness: accuracy on "
                   "1,000 test images (class-balanced; all when fewer) after FGSM at ε (normalised input space, against each "
                   "model's own gradient and answer) and brightness, contrast and gamma factors. The same numbers as "
                   f"`{ui.keynet_cli(kstudy)}`.")
