"""How big a cache? Figure 3: the gain over the network against the cache size, over seeds."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui
from cacheviz.errors import CachevizError

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

MIN_SIZES, MIN_SEEDS = 6, 2

INTRO = """
The paper's **Figure 3**: class-balanced random caches from 0% (the network alone) to 100% of the
training items, θ and λ re-tuned on the validation split at every size, the gain over the network in
percentage points as mean ± s.e.m. over seeds — for the cache model and the cache-only model (λ = 1).
The paper sees gains with small caches already, growing steadily with the cache.
"""

with ui.experiment_page("ss", "How big must the cache be?", INTRO) as choice:
    s = choice.setup

    c1, c2 = st.columns([3, 1])
    frac_text = c1.text_input("Cache sizes, as fractions of the training set", "0, 0.01, 0.03, 0.1, 0.3, 1",
                              key="ss_fractions", help=f"At least {MIN_SIZES} values from 0 (the network alone) to 1.")
    seed_text = c2.text_input("Seeds", "0, 1", key="ss_seeds",
                              help=f"At least {MIN_SEEDS}: each seed draws other random caches of each size.")
    problem = None
    try:
        fractions = sorted(set(ui.parse_numbers(frac_text, "cache sizes")))
        seeds = sorted(set(ui.parse_numbers(seed_text, "seeds", int)))
    except CachevizError as exc:
        fractions, seeds, problem = [], [], str(exc)
    if problem is None and any(f < 0 or f > 1 for f in fractions):
        problem = "Cache sizes are fractions of the training set: give values from 0 to 1, e.g. 0, 0.1, 1."
    elif problem is None and len(fractions) < MIN_SIZES:
        problem = f"Give at least {MIN_SIZES} different cache sizes (you gave {len(fractions)}), e.g. 0, 0.01, 0.03, 0.1, 0.3, 1."
    elif problem is None and len(seeds) < MIN_SEEDS:
        problem = f"Give at least {MIN_SEEDS} different seeds (you gave {len(seeds)}), e.g. 0, 1: the error bars need them."
    if problem:
        st.warning(problem, icon=":material/edit:")
        st.stop()

    n = s.train_limit
    st.caption(
        f"Keys: **{', '.join(choice.layers)}** (sidebar) · cache sizes {', '.join(f'{100 * f:.3g}%' for f in fractions)} "
        f"of {'all' if n is None else f'{n:,}'} training items{' (+ flips)' if s.flip else ''} · seeds "
        f"{', '.join(map(str, seeds))} · {len(fractions) * len(seeds)} caches, each tuned on the validation split."
    )
    sweep = ui.size_sweep(choice, fractions, seeds)
    rows = ui.study_panel(sweep, choice, key="ss", label="Run sweep", note=ui.missing_data_note(choice),
                          lock_key=ui.sweep_lock(choice))
    if rows:
        fig = plots.fig_size_sweep(rows)
        st.plotly_chart(fig, key="ss_fig")
        stem = f"size-sweep-{s.dataset}-{s.model}-{'+'.join(choice.layers)}"
        ui.export_buttons(fig, rows, stem, key="ss_export")
        st.dataframe(ui.size_summary_table(rows), hide_index=True, key="ss_summary")
        with st.expander(f"All {len(rows)} rows (one per size and seed)"):
            st.dataframe(ui.size_table(rows), hide_index=True, key="ss_table")
        st.caption(
            f"Baseline (network alone) {rows[0]['baseline_acc']:.2%}; the same numbers as `python -m cacheviz sweep-size "
            f"--dataset {s.dataset} --model {s.model}{ui.cli_flags(s)} --layers {','.join(choice.layers)} "
            f"--fractions {','.join(f'{f:g}' for f in fractions)} --seeds {','.join(map(str, seeds))}`."
        )
