"""Knowledge store: the cache as a database of examples that grows, is edited and forgets, without training."""
from pathlib import Path

import numpy as np
import streamlit as st

from cacheviz import images, plots, retrieval, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

st.title("Knowledge store: teach and forget without training")

with ui.guard("ks"):
    choice = ui.current()
    if choice.problem:
        ui.show_problem(choice.problem, key="ks_problem")
        st.stop()
    base = ui.store_panel(choice)
    if base is None:
        st.stop()
    ks = ui.session_view(base)  # a student's own copy, or the class store
    ui.own_copy_panel(base)
    classes, head = ks.classes, ks.head
    ws = ks.workspace()
    gray = ws.spec.in_channels == 1

    # --- the store now ---------------------------------------------------------------------------
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Version", head.number, help="Every edit is a new version; none is ever overwritten.")
    c2.metric("Items", f"{head.n_live:,}")
    c3.metric("θ · λ", f"{ks.theta:g} · {ks.lam:g}", help=f"cache-only θ = {ks.theta_cache_only:g}")
    c4.metric("k retrieved", ui.store_k())
    st.markdown(ui.how_it_answers(ks))
    st.caption(ui.where_it_lives(ks))
    counts = ks.class_counts()
    st.dataframe({c: [int(n)] for c, n in zip(classes, counts)}, hide_index=True, key="ks_counts")
    with st.expander(f"Version history ({len(ks.versions)})", expanded=len(ks.versions) > 1):
        st.dataframe(list(reversed(ks.summary())), hide_index=True, key="ks_history",
                     column_order=["version", "op", "detail", "items", "parent", "created"])

    # --- edits -----------------------------------------------------------------------------------
    st.subheader("Edit the store")
    st.caption(ui.edit_caption())
    ui.show_notes()
    forget, teach, back = st.columns([2, 3, 2])
    with forget:
        st.markdown("**Forget a class**")
        present = [c for c in range(len(classes)) if counts[c] > 0]
        if present:
            gone = st.selectbox("Class", present, format_func=classes.__getitem__, key="ks_forget")
            if st.button("Remove class", key="ks_remove", icon=":material/delete:"):
                ui.edit(ks.remove_class, gone)
                st.rerun()
        else:
            st.info("The store holds no item; undo or add images.")
    with teach:
        st.markdown("**Teach: add labelled images**")
        gen = st.session_state.setdefault("ks_upload_gen", 0)
        files = st.file_uploader("Images", type=list(images.ACCEPTED_EXTENSIONS), accept_multiple_files=True,
                                 key=f"ks_files_{gen}", help=f"{', '.join(images.ACCEPTED_EXTENSIONS)}; up to 10 MB each.")
        label = st.selectbox("Their label", list(range(len(classes))), format_func=classes.__getitem__,
                             key="ks_label")
        invert = gray and st.checkbox("Invert light-background images (the training data is light ink on black)",
                                      value=True, key="ks_invert")
        good, names, bad = ui.decode_all(files or [], invert, ws.ds)
        for sentence in bad:
            st.warning(sentence, icon=":material/broken_image:")
        if st.button("Add to the store", key="ks_add", icon=":material/add:", disabled=not good,
                     help=None if good else "Upload at least one readable image first."):
            notes = [("warning", f"Not added: {s}") for s in bad]
            if ui.edit(ks.add_images, good, [label] * len(good), names, notes=notes):
                st.session_state["ks_upload_gen"] = gen + 1  # an empty uploader: the next click adds nothing twice
            st.rerun()
    with back:
        st.markdown("**Undo**")
        if head.undo_target is None:
            st.caption("Nothing to undo: " + ("the store is as created." if head.op == "create"
                                               else "the last edit was an undo (edit again to go on)."))
        if st.button("Undo the last edit", key="ks_undo", icon=":material/undo:", disabled=head.undo_target is None):
            ui.edit(ks.undo)
            st.rerun()

    ui.students_edits(base)

    # --- what changed ----------------------------------------------------------------------------
    st.subheader("What changed")
    numbers = [v.number for v in ks.versions]
    if len(numbers) < 2:
        st.info("No edit yet: remove a class or add images, and the test images' answers before and after show here.")
    else:
        before0, after0 = ui.store_default_pair(ks)
        a, b = st.columns(2)
        before = a.selectbox("Before", numbers, index=numbers.index(before0), key=f"ks_before_{head.number}",
                             format_func=ui.version_label(ks))
        after = b.selectbox("After", numbers, index=numbers.index(after0), key=f"ks_after_{head.number}",
                            format_func=ui.version_label(ks))
        rows = ui.per_class_rows(ks, before, after)
        st.markdown(f"**{ui.store_verdict(ks, rows, before, after)}**")
        st.dataframe(rows, hide_index=True, key="ks_per_class", height=35 * (len(rows) + 1) + 3)
        per = {v: ks.evaluate(v).per_class(len(classes)) for v in (before, after)}
        st.plotly_chart(plots.fig_store_per_class(classes, per[before], per[after], (f"v{before}", f"v{after}")),
                        key="ks_fig")
        for model, label in (("cache_only", "cache-only model"), ("cache", "cache model")):
            st.markdown(f"**Test images whose {label} answer changed**")
            n = ui.changed_gallery(ks, before, after, model)
            st.caption(f"{n} test image{'s' if n != 1 else ''} changed their {label} answer "
                       f"(captions: true · network · version {before} → version {after}; green frame: now right)."
                       if n else f"No test image changed its {label} answer.")

    # --- a query, explained by the stored items ---------------------------------------------------
    st.subheader("Ask the store")
    st.caption("A mistaken answer? Add a few labelled examples above (or this image itself) and ask again.")
    source = st.radio("Query image", ["Test image", "Upload"], horizontal=True, key="ks_source")
    img, truth, name = None, None, None
    if source == "Test image":
        n_test = len(ws.ds.test_x)

        def another():
            st.session_state["ks_test"] = int(np.random.default_rng().integers(n_test))

        t1, t2 = st.columns([3, 1], vertical_alignment="bottom")
        idx = t1.number_input(f"Test image # (0 to {n_test - 1})", 0, n_test - 1, key="ks_test")
        t2.button("Another image", on_click=another, key="ks_another", icon=":material/casino:")
        img, truth, name = ws.ds.test_x[int(idx)].numpy(), int(ws.ds.test_y[int(idx)]), f"test #{int(idx)}"
    else:
        up = st.file_uploader("An image", type=list(images.ACCEPTED_EXTENSIONS), key="ks_query_file")
        if up is not None:
            got, got_names, bad = ui.decode_all([up], False, ws.ds)
            for sentence in bad:
                st.warning(sentence, icon=":material/broken_image:")
            if got:
                img, name = got[0], got_names[0]
                if gray and st.checkbox("Invert the image (dark ink on light paper → light ink on black)",
                                        value=retrieval.background_differs(ws.ds, img), key=f"ks_query_invert_{ui.image_key(img)}"):
                    img = retrieval.invert(img)
    if img is None:
        st.info("Pick a test image or upload one to see which stored items answer it.")
    else:
        ex = ui.store_explain(ks, img)
        pred = int(np.argmax(ex["p"]))
        mark = (lambda c: "") if truth is None else (lambda c: " ✓" if c == truth else " ✗")
        left, right = st.columns([1, 3])
        # an uploaded file's name is the user's text: shown literally (a caption renders Markdown)
        left.image(images.enlarge(retrieval.model_view(ws.spec, img), 160), caption=ui.markdown_text(name), width=160)
        with right:
            p_net, p_only = int(np.argmax(ex["p_net"])), int(np.argmax(ex["p_only"]))
            only = f"**{classes[p_only]}**{mark(p_only)}" if ex["k"] else "nothing (an empty store)"
            st.markdown(f"Network **{classes[p_net]}**{mark(p_net)} · cache-only {only} · "
                        f"cache model **{classes[pred]}**{mark(pred)} ({ex['p'].max():.0%})"
                        + (f" · true label **{classes[truth]}**" if truth is not None else "")
                        + f" — version {head.number}")
            st.plotly_chart(plots.fig_probs(classes, {"p_net": ex["p_net"], "p_mem": ex["p_mem"], "p": ex["p"]},
                                            height=240), key="ks_probs")
        if len(ex["ids"]):
            ui.store_neighbour_gallery(ks, ex, pred)
        else:
            st.info("The store is empty: nothing to retrieve, so only the network answers.")
        if source == "Upload":
            t1, t2 = st.columns([2, 1], vertical_alignment="bottom")
            as_label = t1.selectbox("Teach this image as", list(range(len(classes))), index=pred,
                                    format_func=classes.__getitem__, key="ks_query_label")
            if t2.button("Add this image to the store", key="ks_query_add", icon=":material/school:"):
                ui.edit(ks.add_images, [img], [as_label], [name])
                st.rerun()

    with st.expander("Command line", expanded=False):
        st.caption("The same store, edited from a terminal (every command makes a version this page then shows):")
        st.code("\n".join(ui.store_cli(choice, ks, int(st.session_state.get("ks_forget") or 0))), language="bash")
