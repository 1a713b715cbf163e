"""Analyses behind the papers' figures: module-level noise sensitivity (SINAI Fig. 1, 3), logit-level
gradient norms and selection rules (SINAI Fig. 2, 4), and RFD's Theorem 1 (RFD Fig. 1, Tables 6, 14).

Each analysis is a set of pure functions returning rows (frozen dataclasses, ``common.Row``); ``plots``
draws them and ``sinai analyze <what>`` runs them.
"""
