"""The 2AFC decision rule, defined once for clean evaluation, attacks and the CLI.

A metric answers a 2AFC triplet (reference, left candidate x0, right candidate x1) with the
candidate whose embedding is more similar to the reference's. The rule is the paper authors':
``pred = (sim_right > sim_left)`` (fra31/perceptual-metrics, ``get_sim``), which is also what
auto-attack's ``logits.max(1)[1]`` gives for the logits ``[sim_left, sim_right]``: **a tie picks
the left candidate**. The human label is 1 when most people chose the right candidate
(``p_right > 0.5``), else 0, so a tie is correct exactly when the label is left.

The LPIPS/DreamSim *score* (soft labels, a tie scoring 0.5) is a different quantity, kept by the
evaluation as ``clean_score``; the binarised accuracy the paper reports uses this rule.

Every function works on Python floats and on tensors (element-wise).
"""

from __future__ import annotations

LEFT, RIGHT = 0, 1


def prefers_right(sim_left, sim_right):
    """Whether the metric picks the right candidate: strictly more similar (a tie picks left).

    >>> prefers_right(0.5, 0.5), prefers_right(0.4, 0.5)
    (False, True)
    """
    return sim_right > sim_left


def decision(sim_left, sim_right):
    """The chosen candidate: 1 (right) or 0 (left); an int for floats, a long tensor for tensors."""
    choice = prefers_right(sim_left, sim_right)
    return choice.long() if hasattr(choice, "long") else int(choice)


def is_correct(sim_left, sim_right, label):
    """Whether the metric's choice equals ``label`` (0 left, 1 right); a tie is correct iff label is 0.

    >>> is_correct(0.5, 0.5, 0), is_correct(0.5, 0.5, 1)
    (True, False)
    """
    return prefers_right(sim_left, sim_right) == (label == RIGHT)


def human_label(p_right: float) -> int:
    """The binarised human judgement: 1 if more than half of the people chose the right candidate."""
    return RIGHT if p_right > 0.5 else LEFT
