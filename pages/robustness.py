"""The robustness lab: the paper's Tables 2-4 (minimal adversarial perturbations against the network,
the cache model and the cache-only model, and their transfer) and accuracy-against-strength curves."""
from pathlib import Path

import streamlit as st

from cacheviz import plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
The paper's **Tables 2–4**: for each test image, the smallest perturbation that changes the attacked model's
answer, its size ρ_adv = ‖x_adv − x‖₂ / ‖x‖₂ in the network's normalised input space, and how the three models
do on the adversarials. **Table 2** (gray-box: made against the network, shown to all three): the network keeps
3–10% of its accuracy on its own adversarials, the cache model 56–73%, the cache-only model 61–83%.
**Table 3** (white-box: made against the cache models themselves): ρ_adv grows, and no adversarial at all
was found against the cache-only model. **Table 4**: adversarials made on another network transfer less to the
cache models than to the network. The *strength curve* mode shows accuracy at a fixed list of strengths instead,
for attacks and for corruptions (blur, brightness, contrast, gamma) that need no model.

A caveat the paper leaves open: at a large θ the cache's softmax saturates, so its gradient can vanish — a
gradient attack then fails because it cannot *see*, not because no adversarial exists. The decision-based
**HopSkipJump** attack needs only the model's answers, so it tells the two apart.
"""

with ui.experiment_page("rb", "Robustness lab (Tables 2–4, strength curves)", INTRO) as choice:
    s = choice.setup

    c1, c2, c3 = st.columns([2, 2, 3])
    mode = c1.radio("Mode", ui.ROBUST_MODES, key="rb_mode")
    curve = mode == ui.ROBUST_MODES[1]
    attacks = ui.CURVE_ATTACKS if curve else ui.MINIMAL_ATTACKS
    attack = c2.selectbox("Attack", attacks, format_func=ui.ATTACK_NAMES.get, key=f"rb_attack_{int(curve)}")
    against = None
    if attack in ui.CORRUPTIONS:
        c3.caption("A corruption needs no model: every model is shown the same corrupted images.")
    else:
        against = c3.radio("Model attacked", ui.ROBUST_MODELS, format_func=ui.MODEL_NAMES.get, key="rb_against")

    size = ui.test_part_size(choice)
    default_n = min(ui.PAPER_N, size) if size else ui.PAPER_N
    c4, c5, c6 = st.columns([2, 2, 3])
    n = int(c4.number_input("Images (N)", min_value=1, value=default_n, step=10, key=f"rb_n_{size}",
                            help=f"Drawn at random (seeded) from the test part, never from the tuning part; the paper "
                                 f"attacked {ui.PAPER_N}."))
    seed = int(c5.number_input("Seed", min_value=0, max_value=ui.MAX_SEED, value=0, key="rb_seed",
                               help="Which images are drawn (and the single-pixel attack's pixel order)."))
    if size and n > size:
        st.info(f"The test part of this setup holds {size} images, so all {size} are attacked.")
        n = size

    strengths = None
    if curve:
        text = c6.text_input(f"Strengths: {plots.strength_label(attack)}", ui.strengths_text(attack),
                             key=f"rb_eps_{attack}", help="Numbers separated by commas; each is one point of the curve.")
        strengths, problem = ui.parse_strengths(text, attack)
        if problem:
            st.warning(problem, icon=":material/edit:")
            st.stop()

    source = None
    if not curve and against == "network":
        others = ui.transfer_sources(choice)
        transfer = c6.toggle("Transfer (Table 4): make the adversarials on another network", key="rb_transfer",
                             disabled=not others,
                             help="Adversarials made against another network of this dataset, shown to this setup's "
                                  "three models." if others else f"{s.dataset} has no other network here.")
        if transfer and others:
            source = c6.selectbox("Source network", others, key=f"rb_source_{s.dataset}")
            info = ui.model_info(source)
            if info.error:
                st.warning(f"{source} cannot be loaded: {info.error}", icon=":material/warning:")
                st.stop()
    if attack == "hopskipjump":
        st.caption("HopSkipJump asks the attacked model about a thousand questions per image: expect minutes, on a "
                   "CPU even for digits (about a minute for 5 digits on a 2-core machine).")

    study = ui.robustness_study(choice, attack, against, n, seed, strengths, source)
    rows = ui.study_panel(study, choice, key="rb", label="Run the curve" if curve else "Run the attack",
                          note=ui.missing_data_note(choice), lock_key=ui.sweep_lock(choice))
    if rows:
        stem = f"{study.kind}-{attack}-{against or 'none'}-{s.dataset}-{s.model}"
        if curve:
            fig = plots.fig_robustness_curve(rows)
            st.plotly_chart(fig, key="rb_curve_fig")
            ui.robust_exports(fig, rows, stem, key="rb_export")
            st.dataframe(ui.curve_table(rows), hide_index=True, key="rb_curve_table")
        else:
            first = rows[0]
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Success rate", f"{100 * first['success_rate']:.0f}%",
                      help=f"Images whose {first['against']} answer the attack changed.")
            rho = first["rho_adv"]
            m2.metric("Mean ρ_adv (successes)", "—" if rho is None else f"{rho:.3g}",
                      help="‖x_adv − x‖₂ / ‖x‖₂ in the normalised input space, over the images the attack flipped.")
            m3.metric("Failed", f"{first['n_failed']} of {first['n']}",
                      help="Images left unchanged: the attack found no adversarial within its budget.")
            eps = first.get("epsilon_pixels")
            m4.metric("Mean minimal strength", "—" if first.get("strength") is None else f"{first['strength']:.3g}",
                      help=plots.strength_label(attack) + ("" if eps is None else f"; {eps:.4f} in [0, 1] pixels"))
            fig = plots.fig_attack(rows)
            st.plotly_chart(fig, key="rb_attack_fig")
            ui.robust_exports(fig, rows, stem, key="rb_export")
            st.dataframe(ui.attack_table(rows), hide_index=True, key="rb_attack_table")
            per = ui.attack_strengths(study, choice)
            if per is not None and attack != "pixel" and bool(per["success"].any()):
                with st.expander("The minimal strength of each image"):
                    st.plotly_chart(plots.fig_attack_strengths(per["strength"], per["success"], attack),
                                    key="rb_strengths_fig")
        note = "" if seed == 0 else (" for seed 0 (the command line's --seed also reseeds the split and the tuning, "
                                     "so it has no seed for the images alone)")
        st.caption(f"The same numbers as `{ui.attack_cli(study)}`{note}.")
