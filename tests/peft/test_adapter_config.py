"""Reading a PEFT ``adapter_config.json``: every malformed file gets an error naming it."""

import json

import pytest

from d9d.peft.lora.peft_format import ADAPTER_CONFIG, read_adapter_config

pytestmark = pytest.mark.local

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('"LORA"', "must hold a JSON object, got str"),
    (json.dumps({**LORA, "peft_type": "IA3"}), "peft_type is 'IA3'"),
    (json.dumps({**LORA, "fan_in_fan_out": True}), "fan_in_fan_out=True: changes the outputs"),
    (json.dumps({**LORA, "lora_alpha": "8"}), "lora_alpha must be a number"),
    (json.dumps({**LORA, "alpha_pattern": ["x"]}), "alpha_pattern must be an object"),
    (json.dumps({**LORA, "modules_to_save": "norm"}), "modules_to_save must be a list"),
])
def test_bad_adapter_config_names_the_file(tmp_path, content, message):
    path = tmp_path / ADAPTER_CONFIG
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_adapter_config(tmp_path)
    assert str(path) in str(info.value)


def test_missing_adapter_config_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*has no {ADAPTER_CONFIG}"):
        read_adapter_config(tmp_path)


def test_plain_lora_config_is_returned(tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(LORA))
    assert read_adapter_config(tmp_path) == LORA
