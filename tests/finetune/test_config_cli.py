"""Config validation and the CLI's error reporting: unknown keys and bad values are named, no traceback."""

import importlib.util
import json

import pytest
from pydantic import ValidationError

from d9d.finetune import FinetuneConfig, load_config, main
from d9d.finetune.preflight import check_inputs
from tests.finetune.runner import finetune, write_config
from tests.torchrun import REPO_ROOT, torchrun_command

pytestmark = pytest.mark.local


def test_defaults_are_valid_and_round_trip():
    cfg = FinetuneConfig()
    again = FinetuneConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.peft_config().methods[0].module_name_pattern.fullmatch("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"stepz": 3}, "stepz"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr"),
        ({"data": {"seq_len": 4}}, "data.seq_len"),
        ({"model": {"kind": "generated_llama", "hidden_size": 130, "num_heads": 4}}, "num_heads"),
        ({"peft": {"kind": "lora", "module_name_pattern": ".*", "params": {"r": 0, "alpha": 1}}}, "peft.lora.params.r"),
        ({"peft": {"kind": "lorra"}}, "peft"),
        ({"checkpoint": {"resume": "maybe"}}, "checkpoint.resume"),
        ({"parallel": {"tp": 0}}, "parallel.tp"),
        ({"parallel": {"dp_replicate": -1}}, "parallel.dp_replicate"),
        ({"parallel": {"dp_shard": 2}}, "parallel.dp_shard"),  # derived, not set
    ],
)
def test_bad_config_is_rejected_naming_the_field(config, named):
    with pytest.raises(ValidationError) as info:
        FinetuneConfig.model_validate(config)
    assert named in str(info.value).replace("\n", " ").replace(" ", "") or named in str(info.value)


def test_cli_reports_bad_config_cleanly(tmp_path):
    bad = write_config(tmp_path / "bad.json", {"steps": 0, "optimiser": {"lr": 1e-3}})
    proc = finetune(bad, nproc=None, expect_rc=2)
    assert "Traceback" not in proc.stderr
    assert "optimiser" in proc.stderr
    assert "steps" in proc.stderr


def test_cli_reports_missing_and_malformed_files(tmp_path):
    proc = finetune(tmp_path / "nope.json", nproc=None, expect_rc=2)
    assert "nope.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "broken.json").write_text("{not json")
    proc = finetune(tmp_path / "broken.json", nproc=None, expect_rc=2)
    assert "not valid JSON" in proc.stderr


def test_configs_default_json_spells_out_the_defaults():
    """docs/finetune.md says configs/default.json is the default run; only its work_dir differs."""
    def resolved(cfg: FinetuneConfig) -> dict:  # as --print-config shows it: peft null is the default stack
        return json.loads(cfg.model_copy(update={"peft": cfg.peft_config()}).model_dump_json(exclude={"work_dir"}))

    path = REPO_ROOT / "configs" / "default.json"
    raw = json.loads(path.read_text())
    assert raw.pop("work_dir") == "runs/default"
    assert raw == resolved(FinetuneConfig())  # every field written out, none left to its default
    assert resolved(load_config(path, {})) == raw


def test_overrides_apply_to_nested_fields(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.json", {"steps": 5}), {"checkpoint.resume": True, "steps": 7})
    assert cfg.steps == 7
    assert cfg.checkpoint.resume


def test_override_through_a_non_object_field_is_a_clean_error(tmp_path, capsys):
    config = write_config(tmp_path / "c.json", {"checkpoint": None})
    with pytest.raises(ValueError, match=r"checkpoint\.resume.*'checkpoint' is null"):
        load_config(config, {"checkpoint.resume": True})
    assert main(["--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "'checkpoint'" in err
    assert "Traceback" not in err


def test_parallel_sizes_that_do_not_divide_the_world_are_named(tmp_path):
    """A plain python run is a world of one: tp=2 cannot divide it, and the run says so before building anything."""
    config = write_config(tmp_path / "c.json", {"work_dir": str(tmp_path / "w"), "parallel": {"tp": 2}})
    proc = finetune(config, nproc=None, expect_rc=2)
    assert "error: parallel.dp_replicate (1) x parallel.tp (2) = 2 must divide the world size 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_parallel_sizes_are_checked_against_torchrun_world_before_the_group(tmp_path, capsys):
    """Under torchrun the world size comes from the launch: a config error, status 2, printed once."""
    config = write_config(tmp_path / "c.json", {"work_dir": str(tmp_path / "w"), "parallel": {"tp": 3}})
    cmd = torchrun_command(["-m", "d9d.finetune", "--config", str(config)], nproc=2)
    assert _load_script("demo").run_quietly(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("parallel.tp (3) = 3 must divide the world size 2") == 1, err
    assert "Traceback" not in err


def test_model_folder_without_tokenizer_files_names_them_and_tokenizer_path(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer_config.json").write_text("{}")  # a config alone is no tokenizer
    config = write_config(tmp_path / "c.json", {"model": {"kind": "local", "path": str(model_dir)}})
    err = finetune(config, nproc=None, expect_rc=2).stderr
    assert "Traceback" not in err
    assert f"model.path (the tokenizer folder unless model.tokenizer_path is set): {str(model_dir)!r} has no " \
           "tokenizer files (none of tokenizer.json, tokenizer.model, vocab.txt" in err
    assert "set model.tokenizer_path" in err
    (tmp_path / "tok").mkdir()
    config = write_config(tmp_path / "c.json", {"model": {"kind": "local", "path": str(model_dir),
                                                          "tokenizer_path": str(tmp_path / "tok")}})
    with pytest.raises(ValueError, match=r"model\.tokenizer_path: .*tok' has no tokenizer files"):
        check_inputs(load_config(config, {}))


def test_missing_inputs_are_named_before_the_run(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[]")
    for fields, named in [({"data": {"text_files": [str(tmp_path / "nope.txt")]}}, "data.text_files: .*nope.txt"),
                          ({"init_adapter_dir": str(adapter)}, "adapter_config.json must hold a JSON object")]:
        with pytest.raises(ValueError, match=named):
            check_inputs(load_config(write_config(tmp_path / "c.json", fields), {}))


def test_errors_under_torchrun_print_once_and_the_demo_launcher_keeps_status_2(tmp_path, capsys):
    """Two ranks validate the same bad config: one message; torchrun's own failure report is dropped."""
    demo = _load_script("demo")
    bad = write_config(tmp_path / "bad.json", {"optimizer": {"lr": -1}})
    cmd = torchrun_command(["-m", "d9d.finetune", "--config", str(bad)], nproc=2)
    assert demo.run_quietly(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("optimizer.lr: Input should be greater than 0") == 1, err
    assert "ChildFailedError" not in err
    assert "Traceback" not in err


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
