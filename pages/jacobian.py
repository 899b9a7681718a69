"""Figure 4: the input-output Jacobians of the network, the cache model and the cache-only model
(their spectra and per-image norms), and an explorer of one image's Jacobian."""
from pathlib import Path

import streamlit as st

from cacheviz import images, plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
The paper's **Figure 4**: J(x) = ∂p(y|x)/∂x, the derivative of a model's whole probability vector with respect
to the input, a C × (pixels) matrix per test image. A small J means a small change of the input can move the
answer only a little. **4a**: the mean singular values of J — the cache lowers the first and raises the others.
**4b/c**: |J| per image, the network against the cache model and the cache-only model; a point below the
diagonal is an image where the cache's Jacobian is smaller. The per-image norms are heavy-tailed (most images
saturate the network's softmax, a few are very sensitive), so the table gives the median beside the mean.
"""

with ui.experiment_page("jc", "Jacobians (Fig. 4)", INTRO) as choice:
    s = choice.setup
    size = ui.test_part_size(choice)
    default_n = ui.jacobian_default_n(choice, size)
    c1, c2 = st.columns(2)
    n = int(c1.number_input("Images (N)", min_value=1, value=default_n, step=10, key=f"jc_n_{size}",
                            help="Drawn at random (seeded) from the test part, the same images as the robustness "
                                 "lab's for this N and seed."))
    seed = int(c2.number_input("Seed", min_value=0, max_value=ui.MAX_SEED, value=0, key="jc_seed"))
    if size and n > size:
        st.info(f"The test part of this setup holds {size} images, so all {size} are used.")
        n = size

    study = ui.jacobian_study(choice, n, seed)
    rows = ui.study_panel(study, choice, key="jc", label="Compute the Jacobians",
                          note=ui.missing_data_note(choice), lock_key=ui.sweep_lock(choice))
    if not rows:
        st.stop()

    summ = ui.jacobian_summary(rows)
    fig = plots.fig_jacobian_spectrum(summ)
    st.plotly_chart(fig, key="jc_spectrum_fig")
    st.dataframe(ui.norm_table(summ), hide_index=True, key="jc_norm_table")
    a, b = st.columns(2)
    # a click on a point opens that image in the explorer below
    clicks = [a.plotly_chart(plots.fig_jacobian_scatter(rows, "cache"), key="jc_scatter_cache", on_select="rerun",
                             selection_mode="points"),
              b.plotly_chart(plots.fig_jacobian_scatter(rows, "cache-only"), key="jc_scatter_only",
                             on_select="rerun", selection_mode="points")]
    st.caption("Click a point to open that image in the explorer below.")
    ui.robust_exports(fig, rows, f"jacobian-{s.dataset}-{s.model}-n{study.n}-seed{seed}", key="jc_export")
    note = "" if seed == s.seed else (f" for seed {s.seed} (the command line's --seed also reseeds the split and "
                                      "the tuning, so it has no seed for the images alone)")
    st.caption(f"The same numbers as `{ui.jacobian_cli(study)}`{note}.")

    # -----------------------------------------------------------------------------------------
    st.header("Does a small Jacobian predict a large perturbation?")
    st.markdown("Beyond the paper: for the same images, the robustness lab's **minimal** perturbation (ρ_adv = "
                "‖x_adv − x‖₂ / ‖x‖₂) of an attack made against each model itself, against that model's |J|. A "
                "negative rank correlation says that within one model a small |J| marks an image that needs a large "
                "perturbation; whether |J| also explains why one *model* resists more, the medians in the table tell "
                "(on CIFAR-10 they do not: see the README).")
    attack = st.selectbox("Minimal attack", ui.RHO_ATTACKS, format_func=ui.ATTACK_NAMES.get, key="jc_rho_attack")
    if attack == "hopskipjump":
        st.caption("HopSkipJump asks each model about a thousand questions per image: expect minutes, on a CPU "
                   "even for digits.")
    group = ui.rho_group(choice, attack, study.n, seed)
    got = ui.study_panel(group, choice, key=f"jc_rho_{attack}",
                         label=f"Run the minimal {ui.ATTACK_NAMES[attack]} against each model",
                         note=f"No stored {ui.ATTACK_NAMES[attack]} runs of this setup and seed against all three "
                              "models yet (the robustness lab's, or run them here).",
                         lock_key=ui.sweep_lock(choice))
    if got:
        joined, corr = ui.rho_rows(choice, rows, attack, study.n, seed)
        st.plotly_chart(plots.fig_norm_vs_rho(joined, attack, corr), key="jc_rho_fig")
        if corr:
            st.dataframe(ui.correlation_table(corr), hide_index=True, key="jc_rho_table")
            st.caption("Spearman's rank correlation over the images both studies share and the attack flipped "
                       "(failures have no minimal ρ_adv); negative: the smaller |J|, the larger the perturbation "
                       "needed.")
        else:
            st.info("These images and the stored runs share too few flipped images for a correlation.")

    # -----------------------------------------------------------------------------------------
    st.header("One image's Jacobian")
    result = ui.build_panel(choice, key="jc_build")
    if result is None:
        st.stop()
    index = ui.load_index(choice, result, key="jc_index")
    if index is None:
        st.stop()
    lab = ui.resist_lab(choice, result)
    classes = lab.classes
    order = ui.by_network_norm(rows)
    pick_key = f"jc_img_{ui.setup_tag(s)}_{study.n}_{seed}"
    clicked = ui.clicked_point(clicks, order)
    if clicked is not None and st.session_state.get("jc_last_click") != clicked:
        # only a new click moves the pick: the chart keeps its selection over later reruns
        st.session_state["jc_last_click"] = clicked
        st.session_state[pick_key] = clicked
    test_idx = st.selectbox("Test image (the study's, the network's largest |J| first; or click a point above)",
                            order, format_func=lambda i: f"test #{i} · {classes[int(lab.ws.ds.test_y[i])]} · "
                                                         f"network |J| {ui.norms_of(rows, i).get('network', 0):.3g}",
                            key=pick_key)
    clean = lab.clean(test_idx)
    ex = clean.explanation
    norms = ui.norms_of(rows, test_idx)
    left, right = st.columns([1, 3])
    left.image(images.enlarge(clean.image, 160), width=160, caption=f"test #{test_idx} · true {classes[clean.truth]}")
    left.markdown(" · ".join(f"{m} |J| **{v:.3g}**" for m, v in norms.items()))
    # the three models' answers: p_mem at the cache-only model's own theta, as Figure 4 differentiates it
    right.plotly_chart(plots.fig_probs(classes, {"p_net": ex.p_net, "p": ex.p, "p_mem": clean.p_only}, height=260),
                       key="jc_probs")
    right.caption("p_net: the network · p: the cache model · p_mem: the cache-only model, at its own θ.")
    st.markdown(f"**The cache's {len(ex.labels)} nearest stored images** ({clean.true_neighbours} labelled "
                f"{classes[clean.truth]}; σ is each one's share of p_mem's similarity mass):")
    ui.neighbour_gallery(lab.ws, ex, clean.truth)

    with st.spinner("Jacobian of this image…"):
        maps = lab.heatmaps(test_idx)
    st.plotly_chart(plots.fig_jacobian_heatmaps(maps["cache"], classes,
                                                title="The cache model's |∂p_c/∂x| per class c (summed over "
                                                      "channels; one colour scale)"), key="jc_heatmaps")

    v = lab.victims
    lo, hi = ui.THETA_RANGE
    t1, t2 = st.columns([2, 3])
    theta = t1.slider("θ of the cache-only model", lo, hi, float(min(max(v.theta_cache_only, lo), hi)), 1.0,
                      key="jc_theta")
    t1.markdown("A larger θ sharpens the softmax over the cache's similarities. J carries a factor θ, so it grows "
                "with θ while that softmax is spread over several classes; once it saturates on one class's nearest "
                "stored images J falls, except near a tie between two classes, where it gets steeper still. A large "
                "θ does **not** simply flatten J: measured mean ‖J‖ of the cache-only model on CIFAR-10 (ResNet20) "
                "rose at every step from θ = 10 to 1000, while on digits it peaks near θ = 10 and then falls "
                "(the README's Jacobians section).")
    with st.spinner("Singular values at this θ…"):
        own = lab.spectrum_at_theta(test_idx, v.theta_cache_only)
        at = lab.spectrum_at_theta(test_idx, theta)
    t2.plotly_chart(plots.fig_singular_values({f"tuned θ = {v.theta_cache_only:g}": own, f"θ = {theta:g}": at},
                                              title=f"Cache-only model, test #{test_idx}: singular values of J"),
                    key="jc_theta_fig")
    st.caption(f"θ = {v.theta:g}, λ = {v.lam:g} (cache-only θ = {v.theta_cache_only:g}), tuned on validation; "
               f"keys {', '.join(index.layers)}.")
