"""Which layer? Figure 2: test accuracy with each layer alone as the cache's keys, against depth."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
The paper's **Figure 2**: every tappable layer, from the input image (l/L = 0) to the network's
output (l/L = 1, twice: the logits, and the softmax probabilities the author's code used), used
**alone** as the cache's keys; θ and λ fixed to the middle of their ranges
(θ = 50, λ = 0.5) unless re-tuned per layer. The paper finds that layers close to, but not at, the
output help most and that the input image hurts.
"""

with ui.experiment_page("ls", "Which layer makes the best keys?", INTRO) as choice:
    s = choice.setup

    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    retune = c1.toggle("Re-tune θ, λ per layer", key="ls_retune",
                       help="Grid-search θ and λ on the validation split for every layer, instead of θ = 50, λ = 0.5.")
    exact = c2.toggle("Exact keys (no projection)", key="ls_exact",
                      help="Keep every layer's full activation; early layers are wide, so this needs much more memory.")
    dim = c3.select_slider("Projection dimension D", ui.SWEEP_DIMS, value=1024, key="ls_dim", disabled=exact,
                           help="Layers wider than D are mapped to D dimensions by a seeded random projection, "
                                "which keeps inner products (Johnson–Lindenstrauss); narrower layers stay exact.")
    others = [m for m in ui.MODELS.get(s.dataset, []) if m != s.model]
    extra = st.multiselect(
        "Overlay other models", others, key=f"ls_extra_{s.dataset}",
        placeholder="choose models to overlay" if others else f"{s.model} is the only model for this dataset",
        disabled=not others,
        help="Each model gets its own curve, baseline and best-layer star (same dataset, cache and keys settings).",
    )

    models, infos = [], {}
    for m in [s.model, *extra]:
        info = ui.model_info(m)
        if info.error:
            st.warning(f"{m} is left out: {info.error}", icon=":material/warning:")
            continue
        models.append(m)
        infos[m] = info.infos
    project_dim = None if exact else int(dim)
    gb = {m: ui.sweep_feature_bytes(choice, infos[m], project_dim) / 2**30 for m in models}
    worst = max(gb, key=gb.get)
    layers_note = " · ".join(f"{m}: {len(infos[m])} layers, ≈ {gb[m]:.2g} GB" for m in models)
    st.caption(
        f"Cache: {'all' if s.train_limit is None else f'{s.train_limit:,}'} training items"
        f"{' + flips' if s.flip else ''} (sidebar) · keys {'exact' if exact else f'projected to at most {dim}-d'} · "
        f"features held at once: {layers_note}"
    )
    refusal = None
    if exact and gb[worst] > ui.EXACT_LIMIT_GB:
        refusal = (f"Exact keys of all {len(infos[worst])} layers of {worst} need about {gb[worst]:.0f} GB of memory, "
                   f"more than the {ui.EXACT_LIMIT_GB:.0f} GB this page allows; switch the projection back on or "
                   f"lower the cache size in the sidebar.")
    elif exact and gb[worst] > 1:
        st.warning(f"Exact keys of all layers need a lot of memory: about {gb[worst]:.1f} GB for {worst}.",
                   icon=":material/memory:")

    sweep = ui.layer_sweep(choice, models, project_dim, retune)
    rows = ui.study_panel(sweep, choice, key="ls", label="Run sweep", refusal=refusal, note=ui.missing_data_note(choice),
                          lock_key=ui.sweep_lock(choice))
    if rows:
        fig = plots.fig_layer_sweep(rows)
        st.plotly_chart(fig, key="ls_fig")
        stem = f"layer-sweep-{s.dataset}-{'+'.join(models)}" + ("-retuned" if retune else "") + (
            "-exact" if exact else f"-D{dim}")
        ui.export_buttons(fig, rows, stem, key="ls_export")
        for m in models:
            mine = [r for r in rows if r["model"] == m] or rows
            best = max(mine, key=lambda r: r["acc"])
            at = {r["layer"]: f"{r['acc']:.2%}" for r in mine}
            st.markdown(
                f"**{m}**: best layer **{best['layer']}** (l/L = {best['depth']:.2f}) at {best['acc']:.2%} against "
                f"{best['baseline_acc']:.2%} for the network alone; input image {at.get('input', '—')}, "
                f"logits {at.get('logits', '—')}, probabilities {at.get('probs', '—')}."
            )
        st.dataframe(ui.layer_table(rows), hide_index=True, key="ls_table")
        st.caption(f"{rows[0]['n_test']:,} test items, cache of {rows[0]['n_cache']:,} items; the same numbers as "
                   f"`python -m cacheviz sweep-layers --dataset {s.dataset} --model {s.model}{ui.cli_flags(s)}"
                   f"{' --retune' if retune else ''}{' --exact' if exact else f' --project-dim {dim}'}`.")
