"""The table of GID terms agrees with the config and the search space, which name the terms too."""

from gid.config import BalanceRatios, DistillConfig
from gid.distill.terms import TERMS
from search.space import WEIGHT_SPACE


def test_every_loss_section_of_the_config_is_a_term_with_its_weights_and_ratio():
    sections = {name: field.annotation.model_fields for name, field in DistillConfig.model_fields.items()
                if "enabled" in getattr(field.annotation, "model_fields", {})}
    assert set(sections) == set(TERMS)  # a loss the table lacks would be neither balanced nor searched
    assert set(BalanceRatios.model_fields) == set(TERMS)
    for term, row in TERMS.items():
        assert set(row.weights) == {name for name in sections[term] if name.endswith("weight")}, term


def test_fixed_mode_searches_every_terms_weights():
    assert set(WEIGHT_SPACE) == {f"distill.{term}.{field}" for term, row in TERMS.items() for field in row.weights}
