"""Table 1: error of the network, the cache model, the cache-only model and Cache3, per model."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
The paper's **Table 1**: test error of the network alone (baseline), the cache model, the cache-only
model (λ = 1) and **Cache3** — the best key set of up to 3 layers of the model's last stage, chosen on
validation (every layer alone, then every pair and triple of the N best) — with θ and λ tuned on the
validation split. In the paper the cache model always beats the baseline (ResNet20 on CIFAR-10:
8.33% → 7.58%) while cache-only is worse (11.87%).
"""

with ui.experiment_page("t1", "Table 1: does the cache help every network?", INTRO) as choice:
    s = choice.setup

    options = ui.MODELS.get(s.dataset, [s.model])
    picked = st.multiselect("Models", options, default=[s.model], key=f"t1_models_{s.dataset}",
                            help="Each model is tuned and tested on the same data, cache size and flips (sidebar).")
    c1, c2 = st.columns([3, 2], vertical_alignment="center")
    side = c1.toggle(
        f"Key the 'cache' row on the sidebar's layers ({', '.join(s.layers) or 'none chosen'})",
        key="t1_side", disabled=not s.layers,
        help="Off: each model's default key layers. Cache3 searches its own layers either way: the "
             "layers of the last stage alone, then combinations of the best of them.",
    ) and bool(s.layers)
    top = c2.slider("Cache3 combines the N best single layers", 2, 8, 6, key="t1_top",
                    help="Cache3 scores every layer of the model's last stage alone (all of stage 3 for the CIFAR "
                         "ResNets), then every pair and triple of the N best on validation. With 6, ResNet20's "
                         "search is exhaustive: all 41 sets of up to 3 of its six stage-3 layers.")
    models = []
    for m in picked:
        info = ui.model_info(m)
        if info.error:
            st.warning(f"{m} is left out: {info.error}", icon=":material/warning:")
        else:
            models.append(m)
    if not models:
        st.info("Choose at least one model.")
        st.stop()

    n = s.train_limit
    st.caption(f"{ui.DATASETS.get(s.dataset, s.dataset)} · cache of {'all' if n is None else f'{n:,}'} training items"
               f"{' + flips' if s.flip else ''} (sidebar) · {len(models)} model{'s' if len(models) > 1 else ''}.")
    sweep = ui.table1_sweep(choice, models, sidebar_layers=side, combine_top=top)
    rows = ui.study_panel(sweep, choice, key="t1", label="Run Table 1", note=ui.missing_data_note(choice),
                          lock_key=ui.sweep_lock(choice))
    if rows:
        st.subheader(f"Test error (%) on {s.dataset}")
        st.dataframe(ui.table1_wide(rows, dataset_column=False), hide_index=True, key="t1_wide")
        st.caption("θ, λ: tuned on the validation split (cache-only: λ = 1); keys: the layers, with the key "
                   "dimension in brackets; cache items: how many training items the cache holds.")
        fig = plots.fig_table1(rows)
        st.plotly_chart(fig, key="t1_fig")
        ui.export_buttons(fig, rows, f"table1-{s.dataset}-{'+'.join(models)}", key="t1_export")
        with st.expander(f"All {len(rows)} rows (one per model and variant), as the command line writes them"):
            st.dataframe(rows, hide_index=True, key="t1_rows")
        st.caption(f"The same numbers as `python -m cacheviz table1 --dataset {s.dataset} --models {','.join(models)}{ui.cli_flags(s)}"
                   + (f" --layers {','.join(s.layers)}" if side else "") + f" --combine-top {top}`.")
