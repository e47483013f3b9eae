"""Full-tune configuration."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from d9d.peft.module_match import ModuleNamePattern


class FullTuneConfig(BaseModel):
    """Train every parameter of the modules whose qualified name fully matches ``module_name_pattern``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["full_tune"] = "full_tune"
    module_name_pattern: ModuleNamePattern
