"""Every package imports on its own (no cycle that works only through import order), and the lower layers
(``d9d.model_state``, ``d9d.parallel``, ``d9d.adapter``) never pull in ``d9d.peft`` or the compiled extension."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.local

PACKAGES = [
    "d9d", "d9d.adapter", "d9d.dtensor", "d9d.model_state", "d9d.model_state.mapper", "d9d.model_state.io",
    "d9d.model_state.io.atomic", "d9d.parallel", "d9d.ops", "d9d.peft", "d9d.peft.lora", "d9d.peft.lora.peft_format",
    "d9d.peft.full_tune", "d9d.peft.all", "d9d.finetune",
]

# Modules whose import must not load these (a peft import from below is a layering cycle; the extension is heavy
# and a file-system helper has no use for it).
MUST_NOT_LOAD = {
    "d9d.adapter": ["d9d.peft", "d9d._C", "d9d.ops"],
    "d9d.model_state": ["d9d.peft"],
    "d9d.model_state.mapper": ["d9d.peft", "d9d._C"],
    "d9d.model_state.io": ["d9d.peft"],
    "d9d.model_state.io.atomic": ["d9d.peft", "d9d._C", "d9d.ops"],
    "d9d.parallel": ["d9d.peft"],
}


def _loaded_after_import(module: str) -> set[str]:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'd9d' or m.startswith('d9d.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"import {module} failed on its own:\n{result.stderr}"
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", PACKAGES)
def test_each_package_imports_alone_in_a_fresh_process(module):
    loaded = _loaded_after_import(module)
    assert module in loaded
    forbidden = [m for m in loaded for prefix in MUST_NOT_LOAD.get(module, [])
                 if m == prefix or m.startswith(prefix + ".")]
    assert not forbidden, f"importing {module} loaded {sorted(forbidden)}"
