"""The app's side of cacheviz: the only package (with pages/) that imports Streamlit.

    state      the shared sidebar: presets and the setup it describes
    jobs       the job board (pure Python): background work any session can follow
    resources  engine objects shared by all sessions, in bounded caches
    panels     a study's stored result or its run button and progress; errors as one sentence
    studies    the studies the pages ask for, built from the sidebar's choice
    tables     rows as tables, CSV and PNG downloads
    nav        page config, navigation, the entry-script guard
    robustness the robustness lab's studies and tables, and the "Why it resists" view's models
    jacobian   the Jacobians page (Figure 4): its study, |J| table, command line, explorer order
    early      the "Answer early" page: its study, exit layers, tables at one tau, command line
    knowledge  the "Knowledge store" page: creating the store, edits, what an edit changed, queries
    roles      the teacher and the students: sign-in, a student's own store branch, who starts builds

Pages read widgets, build a study, look it up or run it through `panels`, and draw; they use
the names re-exported here.
"""
import logging as _logging
import os as _os

from .early import (early_cli, early_layers, early_study, early_table, faster_within, keynet_cli, keynet_default,
                    keynet_label, keynet_model, keynet_query, keynet_study, keynet_tables, keynet_theta,
                    trained_keynets)
from .jacobian import (RHO_ATTACKS, THETA_RANGE, by_network_norm, clicked_point, correlation_table, jacobian_cli, jacobian_default_n,
                       jacobian_study, jacobian_summary, norm_table, norms_of, rho_group, rho_rows)
from .jobs import Job, JobBoard
from .knowledge import (changed_gallery, decode_all, edit, edit_caption, how_it_answers, open_store, own_copy_panel,
                        per_class_rows, session_view, show_notes, store_cli, store_default_pair, store_explain, store_k,
                        store_neighbour_gallery, store_panel, store_verdict, students_edits, version_label,
                        where_it_lives)
from .messages import WIDGETS, markdown_text, message, shown, upload_name
from .nav import ensure_entrypoint, entrypoint_started, page_config, pages
from .panels import build_panel, experiment_page, guard, index_job, load_index, show_problem, study_panel
from .robustness import (ATTACK_NAMES, CORRUPTIONS, CURVE_ATTACKS, MAX_EPSILON, MAX_SEED, MINIMAL_ATTACKS,
                         MODEL_NAMES, NEIGHBOURS, PAPER_N, RESIST_ATTACKS, ROBUST_MODELS, ROBUST_MODES, attack_cli,
                         attack_strengths, attack_table, attack_verdict, curve_table, eps_in_pixels, parse_strengths,
                         neighbour_gallery, pixel_scale, resist_lab, resist_verdict, robust_exports, robustness_study, strengths_text,
                         test_part_size, transfer_sources)
from .roles import (ASK_TEACHER, announce, is_teacher, role_sidebar, session_branch, start_refusal,
                    teacher_mode_on)
from .resources import decode, image_key, picks, query, result_tag, thumbnails, workspace
from .state import (CIFAR, CUSTOM, DATASETS, K_DATASET, K_DEVICE, K_FLIP, K_FRACTION, K_LAYERS, K_MODEL,
                    K_PRESET, K_PROTOCOL, MODELS, OFFLINE, PAPER, PRESETS, PROTOCOLS, Choice, apply_preset, current, key_bytes, model_info,
                    setup_tag, sidebar)
from .studies import (EXACT_LIMIT_GB, SWEEP_DIMS, cli_flags, compare_defaults, layer_sweep, missing_data_note,
                      size_sweep, sweep_feature_bytes, sweep_lock, table1_sweep)
from .tables import (export_buttons, layer_table, parse_numbers, pct, size_summary_table, size_table,
                     table1_wide)

class _RedactingFormatter(_logging.Formatter):
    """A server log is read by more people than its operator: no password or token in it, even
    inside a traceback of an error nobody foresaw."""

    def format(self, record: _logging.LogRecord) -> str:
        from ..kdb import redact

        return redact(super().format(record))


# The app's own log: errors always; CACHEVIZ_LOG_LEVEL=INFO adds jobs' stages and when each
# session's run had its result (benchmarks/load.py reads them); an unknown level means WARNING.
_log = _logging.getLogger("cacheviz.app")
if not _log.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)
    _level = _os.environ.get("CACHEVIZ_LOG_LEVEL", "WARNING").upper()
    _log.setLevel(_level if _level in ("DEBUG", "INFO", "WARNING", "ERROR") else "WARNING")
    _log.propagate = False

__all__ = [
    "early_cli", "early_layers", "early_study", "early_table", "faster_within", "keynet_cli", "keynet_default", "keynet_label", "keynet_model", "trained_keynets", "keynet_study",
    "keynet_tables", "keynet_query", "keynet_theta",
    "changed_gallery", "decode_all", "edit", "how_it_answers", "open_store", "per_class_rows", "show_notes",
    "store_cli", "store_default_pair", "store_explain", "store_k", "store_neighbour_gallery", "store_panel",
    "store_verdict", "version_label", "where_it_lives", "edit_caption", "own_copy_panel", "session_view", "students_edits",
    "ASK_TEACHER", "announce", "is_teacher", "role_sidebar", "session_branch", "start_refusal", "teacher_mode_on",
    "Job", "JobBoard", "WIDGETS", "message", "markdown_text", "shown", "upload_name", "ensure_entrypoint", "entrypoint_started", "page_config", "pages",
    "build_panel", "experiment_page", "guard", "index_job", "load_index", "show_problem", "study_panel", "decode", "image_key",
    "picks", "query", "result_tag", "thumbnails", "workspace", "CIFAR", "CUSTOM", "DATASETS", "K_DATASET",
    "K_DEVICE", "K_FLIP", "K_FRACTION", "K_LAYERS", "K_MODEL", "K_PRESET", "K_PROTOCOL", "MODELS", "OFFLINE", "PAPER",
    "PRESETS", "PROTOCOLS",
    "Choice", "apply_preset", "current", "key_bytes", "model_info", "setup_tag", "sidebar", "EXACT_LIMIT_GB",
    "SWEEP_DIMS", "cli_flags", "compare_defaults", "layer_sweep", "missing_data_note", "size_sweep",
    "sweep_feature_bytes", "sweep_lock", "table1_sweep", "export_buttons", "layer_table", "parse_numbers", "pct",
    "size_summary_table", "size_table", "table1_wide",
    "ATTACK_NAMES", "CORRUPTIONS", "CURVE_ATTACKS", "MAX_EPSILON", "MAX_SEED", "MINIMAL_ATTACKS", "MODEL_NAMES",
    "NEIGHBOURS", "PAPER_N", "RESIST_ATTACKS", "ROBUST_MODELS", "ROBUST_MODES", "attack_cli", "attack_strengths",
    "attack_table", "attack_verdict", "curve_table", "eps_in_pixels", "parse_strengths", "pixel_scale", "resist_lab",
    "resist_verdict", "robust_exports", "robustness_study", "strengths_text", "test_part_size", "transfer_sources",
    "THETA_RANGE", "by_network_norm", "jacobian_cli", "jacobian_default_n", "jacobian_study", "jacobian_summary",
    "norm_table", "norms_of", "RHO_ATTACKS", "clicked_point", "correlation_table", "rho_group", "rho_rows", "neighbour_gallery",
]
