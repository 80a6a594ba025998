"""The GID terms: what the Distiller, the gradient balance and the search space know of each loss.

A term's config section is ``distill.<term>`` (``enabled`` and its weight fields) and its gradient ratio is
``distill.balance.ratios.<term>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gid.config import DistillConfig


@dataclass(frozen=True)
class Term:
    weights: dict[str, str]  # its weight fields in ``distill.<term>``, each with its name in ``balance_weight_<name>``
    losses: tuple[str, ...]  # the loss keys the Distiller returns for it; the balance measures and scales them as one


#: In the order the Distiller adds their losses.
TERMS = {
    "feature": Term(weights={"weight": "feature"}, losses=("loss_feature",)),
    "relation": Term(weights={"weight": "relation"}, losses=("loss_relation",)),
    "response": Term(
        weights={"cls_weight": "response_cls", "reg_weight": "response_reg"},
        losses=("loss_response_cls", "loss_response_reg", "loss_response_roi_cls", "loss_response_roi_reg"),
    ),
}


def enabled_terms(config: DistillConfig) -> list[str]:
    return [term for term in TERMS if getattr(config, term).enabled]
