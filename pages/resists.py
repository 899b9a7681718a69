"""Why the cache resists: one test image, its adversarial at an epsilon you choose, and what the network
and the cache's neighbours make of both."""
from pathlib import Path

import streamlit as st

from cacheviz import images, plots, ui

ui.ensure_entrypoint(Path(__file__).resolve().parents[1] / "app.py")  # see ui.ensure_entrypoint

INTRO = """
An adversarial perturbation is made to push the **network's** answer over a decision boundary. The cache
model also asks *which stored training images does this image's key resemble?* — a key taken from layers
before the output, where the perturbation may move the image much less. Pick a test image and an ε: the
page shows the clean and the adversarial image, the perturbation, p_net, p_mem and p for both, and the
nearest stored images the cache retrieves for each.
"""

st.title("Why it resists: the cache's view of an adversarial")
st.markdown(INTRO)


def verdicts(side, classes):
    truth = side.truth
    mark = lambda c: "✓" if c == truth else "✗"  # noqa: E731
    p = side.preds
    return (f"network **{classes[p['network']]}** {mark(p['network'])} · cache model **{classes[p['cache']]}** "
            f"{mark(p['cache'])} · cache-only **{classes[p['cache-only']]}** {mark(p['cache-only'])}")


with ui.guard("wr"):
    choice = ui.current()
    result = ui.build_panel(choice, key="wr")
    if result is None:
        st.stop()
    index = ui.load_index(choice, result, key="wr_index")
    if index is None:
        st.stop()
    lab = ui.resist_lab(choice, result)
    ws = lab.ws
    classes = ws.ds.classes

    c1, c2 = st.columns([3, 1])
    seed = int(c2.number_input("Seed", min_value=0, max_value=ui.MAX_SEED, value=0, key="wr_seed",
                               help="The robustness lab's images for this seed, in the order it draws them."))
    pool = lab.sample(ui.PAPER_N, seed)
    test_idx = c1.selectbox(f"Test image (the robustness lab's first {len(pool)} for this seed)", pool,
                            format_func=lambda i: f"test #{i} · {classes[int(ws.ds.test_y[i])]}",
                            key=f"wr_img_{ui.setup_tag(choice.setup)}_{seed}")
    c3, c4, c5 = st.columns([1, 2, 3])
    attack = c3.radio("Attack", ui.RESIST_ATTACKS, format_func=ui.ATTACK_NAMES.get, key="wr_attack")
    against = c4.radio("Model attacked", ui.ROBUST_MODELS, format_func=ui.MODEL_NAMES.get, key="wr_against")
    eps = c5.slider("ε — the perturbation's L∞ size in the normalised input space", 0.0, ui.MAX_EPSILON, 0.05,
                    0.001, format="%.3f", key="wr_eps")
    c5.caption(f"ε = {eps:.3f} is {ui.eps_in_pixels(ws.spec, eps)}: each pixel moves by at most that much.")

    with st.spinner("Attacking…"):  # I-FGSM's ten gradient steps take a moment on a large cache
        cmp = lab.compare(test_idx, attack, against, eps, k=ui.NEIGHBOURS)
    a, b, d = st.columns(3)
    size = 192
    a.image(images.enlarge(cmp.clean.image, size), width=size,
            caption=f"clean · true {classes[cmp.clean.truth]}")
    b.image(images.enlarge(cmp.adv.image, size), width=size,
            caption=f"adversarial · ρ_adv {cmp.rho:.4f}")
    d.image(images.enlarge(cmp.delta_image, size), width=size,
            caption=(f"perturbation ×{cmp.factor:.3g} around grey · max |δ| {cmp.max_delta:.4f} in pixels "
                     f"({255 * cmp.max_delta:.1f}/255)") if cmp.max_delta > 0 else "no perturbation (ε = 0)")
    st.markdown(f"{ui.attack_verdict(cmp, classes)} ρ_adv = **{cmp.rho:.4f}**.")

    left, right = st.columns(2)
    for col, name, sd in ((left, "Clean", cmp.clean), (right, "Adversarial", cmp.adv)):
        with col:
            st.subheader(name)
            st.markdown(verdicts(sd, classes))
            ex = sd.explanation
            st.plotly_chart(plots.fig_probs(classes, {"p_net": ex.p_net, "p_mem": ex.p_mem, "p": ex.p}, height=260),
                            key=f"wr_probs_{name}")
            st.caption(f"{sd.true_neighbours} of the {len(ex.labels)} nearest stored images are labelled "
                       f"{classes[sd.truth]}; together they hold {ex.shares.sum():.0%} of the similarity mass.")
            ui.neighbour_gallery(ws, ex, sd.truth)
    st.info(f"**Does the adversarial still retrieve its true class?** {ui.resist_verdict(cmp, classes)}")
    st.caption(f"θ = {lab.victims.theta:g}, λ = {lab.victims.lam:g} (cache-only θ = {lab.victims.theta_cache_only:g}), "
               f"tuned on validation; keys {', '.join(index.layers)}. Green frame: the true label; red: another. "
               "The label attacked is the attacked model's own answer on the clean image.")
