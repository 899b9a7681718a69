"""Neighbours: one image, its nearest stored items, and how p_net, p_mem and p follow from them."""
from pathlib import Path

import numpy as np
import streamlit as st

from cacheviz import images, plots, retrieval, ui
from cacheviz.errors import CachevizError

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

SOURCES = ["Test image", "Upload", "Camera"]
PICKS = ["at random", "by class", "wrong for the network, right with the cache", "right for the network, wrong with the cache"]

st.title("Neighbours: what the cache remembers about an image")


def pick_test_image(ws, pk):
    """A test image chosen by class, at random, or among those the cache fixed / broke."""
    classes = ws.ds.classes
    how = st.radio("Pick a test image", PICKS, horizontal=True, key="nb_pick")
    if how == PICKS[2]:
        pool = pk.fixed()
    elif how == PICKS[3]:
        pool = pk.broken()
    elif how == PICKS[1]:
        c = st.selectbox("Class", list(range(len(classes))), format_func=classes.__getitem__, key="nb_class")
        pool = pk.of_class(c)
    else:
        pool = pk.test_idx
    if len(pool) == 0:
        st.info("No test item of this setup falls in that group; pick another group or another setup.")
        return None
    pool = [int(i) for i in pool]
    if how in PICKS[2:]:
        order = {int(t): k for k, t in enumerate(pk.test_idx)}

        def describe(i):
            k = order[i]
            return (f"test #{i} · true {classes[pk.y[k]]} · network {classes[pk.pred_net[k]]} → "
                    f"cache {classes[pk.pred_cache[k]]}")

        return st.selectbox(f"{len(pool)} test items", pool, format_func=describe, key=f"nb_in_{PICKS.index(how)}")
    state = f"nb_idx_{PICKS.index(how)}"
    another = st.button("Another image", icon=":material/casino:", key="nb_another")
    if another or st.session_state.get(state) not in pool:
        st.session_state[state] = int(np.random.default_rng().choice(pool))
    return st.session_state[state]


def queries_from_files(files):
    """(name, image) for every upload that decodes; a one-sentence warning for every one that does not."""
    good = []
    for f in files:
        try:
            name = ui.upload_name(f.name)
            good.append((name, ui.decode(f.getvalue(), name)))
        except CachevizError as exc:
            st.warning(str(exc), icon=":material/broken_image:")
    return good


def gallery(ws, ex, size, short=False):
    classes = ws.ds.classes
    colors = [plots.MATCH if l == ex.pred else plots.MISMATCH for l in ex.labels]
    thumbs = ui.thumbnails(retrieval.neighbour_images(ws.ds, ex), colors, size=size)
    caps = [
        (f"{classes[l]} · {sh:.1%}" if short else f"#{r + 1} {classes[l]} · σ {sh:.1%}") + (" · flip" if fl else "")
        for r, (l, sh, fl) in enumerate(zip(ex.labels, ex.shares, ex.flipped))
    ]
    st.image(thumbs, caption=caps, width=int(thumbs[0].shape[1]))
    if short:
        st.caption(f"The top {len(ex.labels)} hold **{ex.shares.sum():.1%}** of the similarity mass.")
    else:
        st.caption(
            f"The top {len(ex.labels)} hold **{ex.shares.sum():.1%}** of the similarity mass at θ = {ex.theta:g}. "
            f"Green frame: label = the prediction ({classes[ex.pred]}); red: another label."
        )


with ui.guard("nb"):
    choice = ui.current()
    result = ui.build_panel(choice, key="nb")
    if result is None:
        st.stop()
    s, where, dev = choice.setup, str(choice.data_dir), choice.device
    tag = ui.result_tag(result)
    ws = ui.workspace(s, where, dev, tag)
    classes = ws.ds.classes

    # --- the query -----------------------------------------------------------------------------
    source = st.radio("Query image", SOURCES, horizontal=True, key="nb_source")
    named, truth = [], None
    if source == "Test image":
        idx = pick_test_image(ws, ui.picks(s, where, tag))
        if idx is not None:
            named = [(f"test #{idx}", ws.ds.test_x[idx].numpy())]
            truth = int(ws.ds.test_y[idx])
    elif source == "Upload":
        files = st.file_uploader(
            "Upload one or more images", type=list(images.ACCEPTED_EXTENSIONS), accept_multiple_files=True,
            key="nb_files", help=f"{', '.join(images.ACCEPTED_EXTENSIONS)}; up to 10 MB each.",
        )
        named = queries_from_files(files or [])
    else:
        photo = st.camera_input("Take a photo", key="nb_camera")
        if photo is not None:
            named = queries_from_files([photo])
    if not named:
        st.info("Choose a test image, upload an image, or take a photo to see its neighbours.")
        st.stop()
    if len(named) > 1:
        which = st.radio("Explain", list(range(len(named))), format_func=lambda i: named[i][0], horizontal=True,
                         key="nb_which")
        name, img = named[which if which is not None and which < len(named) else 0]
    else:
        name, img = named[0]
    key = f"test:{name}" if truth is not None else f"upload:{ui.image_key(img)}"
    original = img
    if truth is None and ws.spec.in_channels == 1:
        # One checkbox; its value is remembered per image (a selection), defaulting to what the
        # image's background suggests.
        remembered = st.session_state.setdefault("nb_inv_by_image", {})
        ikey = ui.image_key(img)
        if st.session_state.get("nb_inv_for") != ikey:
            st.session_state["nb_inv_for"] = ikey
            st.session_state["nb_inv"] = remembered.get(ikey, retrieval.background_differs(ws.ds, img))
        inverted = st.checkbox("Invert the image (dark ink on light paper → light ink on black, like the training data)",
                               key="nb_inv")
        remembered[ikey] = inverted
        if inverted:
            img, key = retrieval.invert(img), key + ":inv"

    # --- theta and lam: the prediction follows at once, from the stored similarities -----------
    # Widget keys carry the setup (a new setup starts at its tuned values) and a generation
    # that "Tuned θ, λ" bumps: new sliders, created at the tuned values.
    tag = ui.setup_tag(s)
    gen_key = f"nb_gen_{tag}"
    gen = st.session_state.get(gen_key, 0)
    tuned = (float(round(result["theta"] * 2) / 2), float(round(result["lam"], 2)))

    def reset():
        st.session_state[gen_key] = gen + 1

    c1, c2, c3, c4 = st.columns([3, 3, 2, 2], vertical_alignment="bottom")
    theta = c1.slider("θ — sharpness of the cache's vote", 1.0, 100.0, tuned[0], 0.5, key=f"nb_theta_{tag}_{gen}")
    lam = c2.slider("λ — weight of the cache", 0.0, 1.0, tuned[1], 0.01, key=f"nb_lam_{tag}_{gen}")
    k = c3.select_slider("Neighbours shown", [4, 8, 12, 16, 24, 32], value=12, key="nb_k")
    c4.button("Tuned θ, λ", on_click=reset, key="nb_reset", help=f"θ = {result['theta']:g}, λ = {result['lam']:g}")

    index = ui.load_index(choice, result, key="nb_main")
    if index is None:
        st.stop()
    q = ui.query(s, where, dev, tag, (), key, img)
    ex = retrieval.explain(index, q, theta, lam, k=k)

    left, right = st.columns([1, 2])
    with left:
        h, w = ws.spec.input_size
        view = retrieval.model_view(ws.spec, img)
        seen = (f"as the model sees it: {h}×{w}{', gray' if ws.spec.in_channels == 1 else ''}, then normalised "
                f"(mean {', '.join(f'{m:g}' for m in ws.spec.mean)}; std {', '.join(f'{v:g}' for v in ws.spec.std)})")
        if truth is None:
            a, b = st.columns(2)
            a.image(images.enlarge(original, 160), caption=f"{name} ({original.shape[1]}×{original.shape[0]})")
            b.image(images.enlarge(view, 160), caption=seen)
        else:
            st.image(images.enlarge(view, 192), caption=f"{name}, {seen}", width=192)
    with right:
        verdict = lambda c: "" if truth is None else (" ✓" if c == truth else " ✗")  # noqa: E731
        st.markdown(
            f"Network **{classes[ex.pred_net]}**{verdict(ex.pred_net)} ({ex.p_net.max():.0%}) · "
            f"cache vote **{classes[ex.pred_mem]}**{verdict(ex.pred_mem)} ({ex.p_mem.max():.0%}) · "
            f"mixed p **{classes[ex.pred]}**{verdict(ex.pred)} ({ex.p.max():.0%})"
            + (f" · true label **{classes[truth]}**" if truth is not None else "")
        )
        st.plotly_chart(plots.fig_probs(classes, {"p_net": ex.p_net, "p_mem": ex.p_mem, "p": ex.p}), key="nb_probs")

    st.subheader(f"The {len(ex.labels)} nearest stored images ({', '.join(index.layers)})")
    gallery(ws, ex, size=96)

    # --- two key layers side by side -------------------------------------------------------------
    st.divider()
    if st.toggle("Compare two key layers for this image", key="nb_compare"):
        names = [i.name for i in choice.layer_infos]
        if not names:
            st.info("This model's layers could not be listed; check the setup in the sidebar.")
            st.stop()
        defaults = ui.compare_defaults(choice)
        cols = st.columns(2)
        picked = []
        for col, label, default, skey in zip(cols, ("Layer A", "Layer B"), defaults, ("nb_la", "nb_lb")):
            wkey = f"{skey}_{s.model}"
            if st.session_state.get(wkey) not in names:
                st.session_state[wkey] = default
            picked.append(col.selectbox(label, names, key=wkey))
        st.caption(f"Each layer alone keys the same {len(index):,} stored items; p_mem at the θ above (λ = 1).")
        for n, (col, layer) in enumerate(zip(cols, picked)):
            with col:
                gb = ui.key_bytes(choice, [layer], rows=len(index)) / 2**30
                big = gb > 1.5 and ui.index_job(choice, (layer,)) is None
                if big and ui.start_refusal():  # minutes of extraction: the teacher's to start
                    st.info(ui.start_refusal(), icon=":material/school:")
                    continue
                if big and not st.button(
                    f"Prepare {layer} keys anyway", key=f"nb_big_{n}"
                ):
                    st.warning(f"{layer} keys need about {gb:.1f} GB of memory and take minutes to extract; "
                               f"pick a narrower layer, or prepare them anyway.")
                    continue
                idx_l = ui.load_index(choice, result, (layer,), key=f"nb_cmp_{n}")
                if idx_l is None:
                    continue
                ex_l = retrieval.explain(idx_l, ui.query(s, where, dev, tag, (layer,), key, img), theta, 1.0, k=8)
                st.markdown(f"**{layer}** · {idx_l.memory.dim:,}-d keys · cache vote **{classes[ex_l.pred_mem]}**"
                            + (f"{verdict(ex_l.pred_mem)}" if truth is not None else ""))
                gallery(ws, ex_l, size=88, short=True)
                st.plotly_chart(plots.fig_probs(classes, {"p_mem": ex_l.p_mem}, height=220), key=f"nb_pm_{n}")

    # --- a trained key network instead of the network's keys -------------------------------------
    if st.toggle("Query with a trained key network", key="nb_keynet",
                 help="A small CNN trained to map the image straight to one layer's keys (the Answer early page)."):
        nets = ui.trained_keynets(choice)
        if not nets:
            st.info("No key network is trained for this setup yet: train one under *Speed → Answer early*.")
            st.stop()
        pick = st.selectbox("Key network", list(range(len(nets))), format_func=lambda i: ui.keynet_label(nets[i]),
                            key="nb_kn_pick")
        kst = nets[pick]
        idx_k = ui.load_index(choice, result, (kst.layer,), key="nb_kn_index")
        net_k = ui.keynet_model(choice, kst, ws.spec)
        if idx_k is None or net_k is None:
            st.stop()
        theta_k = ui.keynet_theta(choice, kst) or theta
        ex_k = retrieval.explain(idx_k, ui.keynet_query(net_k, ws.spec, idx_k, img, q.p_net), theta_k, 1.0, k=k)
        st.markdown(f"**Key network → {kst.layer}** ({idx_k.memory.dim:,}-d keys, the network never runs) · cache "
                    f"vote **{classes[ex_k.pred_mem]}**{verdict(ex_k.pred_mem)} ({ex_k.p_mem.max():.0%}) at its tuned "
                    f"θ = {theta_k:g}, against all {len(idx_k):,} stored items")
        gallery(ws, ex_k, size=88, short=True)
