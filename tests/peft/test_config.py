"""PEFT configs: validation and JSON round trips."""

import re

import pytest
from pydantic import ValidationError

from d9d.peft.all import PeftStackConfig, peft_method_from_config
from d9d.peft.all.method import PeftStack
from d9d.peft.full_tune import FullTune, FullTuneConfig
from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters
from d9d.peft.lora.config import kept_fraction
from tests.fixtures import full_tune, lora, stack

pytestmark = pytest.mark.local


def make_stack() -> PeftStackConfig:
    return stack(lora(r=8, alpha=16, dropout=0.05, use_rslora=True, dtype="float32"), stack(full_tune()))


def test_json_round_trip_keeps_config_and_working_patterns():
    config = make_stack()
    restored = PeftStackConfig.model_validate_json(config.model_dump_json())
    assert restored == config
    lora = restored.methods[0]
    assert isinstance(lora, LoRAConfig)
    assert isinstance(lora.module_name_pattern, re.Pattern)
    assert lora.module_name_pattern.fullmatch("layers.3.attention.q_proj")
    assert not lora.module_name_pattern.fullmatch("layers.3.feed_forward.0")
    assert isinstance(restored.methods[1], PeftStackConfig)


def test_factory_builds_nested_methods():
    method = peft_method_from_config(make_stack())
    assert isinstance(method, PeftStack)
    assert isinstance(method.methods[0], LoRA)
    assert isinstance(method.methods[1], PeftStack)
    assert isinstance(method.methods[1].methods[0], FullTune)


def test_factory_rejects_unknown_config_type():
    with pytest.raises(TypeError, match="unknown PEFT config type LoRAParameters"):
        peft_method_from_config(LoRAParameters(r=1, alpha=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [("r", 0), ("r", -2), ("alpha", 0), ("alpha", -1.0), ("dropout", -0.1), ("dropout", 1.0), ("dropout", 1.5)],
)
def test_bad_lora_parameters_name_the_field(field, value):
    kwargs = {"r": 4, "alpha": 8.0, "dropout": 0.0, field: value}
    with pytest.raises(ValidationError, match=field):
        LoRAParameters(**kwargs)


def test_unknown_kind_in_json_is_rejected_naming_kind():
    bad = '{"kind": "stack", "methods": [{"kind": "ia3", "module_name_pattern": ".*"}]}'
    with pytest.raises(ValidationError, match="kind") as info:
        PeftStackConfig.model_validate_json(bad)
    assert "ia3" in str(info.value)


def test_unknown_field_is_rejected_naming_it():
    bad = '{"kind": "lora", "module_name_pattern": ".*", "params": {"r": 4, "alpha": 8, "rank": 3}}'
    with pytest.raises(ValidationError, match="rank"):
        LoRAConfig.model_validate_json(bad)


def test_invalid_regex_is_rejected():
    with pytest.raises(ValidationError, match="module_name_pattern"):
        FullTuneConfig.model_validate_json('{"module_name_pattern": "(unclosed"}')


def test_empty_stack_is_rejected():
    with pytest.raises(ValidationError, match="methods"):
        PeftStackConfig(methods=[])


def test_inline_flags_round_trip_and_compiled_flags_are_refused():
    config = FullTuneConfig.model_validate_json(r'{"module_name_pattern": "(?i)layers\\.0\\.NORM"}')
    assert config.module_name_pattern.fullmatch("layers.0.norm")
    assert FullTuneConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValidationError, match=r"module_name_pattern[\s\S]*IGNORECASE.*inline"):
        FullTuneConfig(module_name_pattern=re.compile("NORM", re.IGNORECASE))


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e308])
def test_alpha_whose_scale_is_not_finite_in_float32_is_refused(alpha):
    with pytest.raises(ValidationError, match="alpha"):
        LoRAParameters(r=1, alpha=alpha)
    assert LoRAParameters(r=1, alpha=1e38).scale == 1e38


@pytest.mark.parametrize("dropout", [0.99999, 0.999995, 0.99985])
def test_dropout_the_mask_cannot_resolve_is_refused(dropout):
    with pytest.raises(ValidationError, match=rf"dropout={dropout}.*1/65536"):
        LoRAParameters(r=1, alpha=1, dropout=dropout)


def test_every_dropout_up_to_0_999_keeps_its_fraction_within_1_percent():
    for dropout in [i / 100_000 for i in range(0, 99_901, 7)]:
        params = LoRAParameters(r=1, alpha=1, dropout=dropout)
        assert kept_fraction(params.dropout) == pytest.approx(1 - dropout, rel=0.01)
