"""Stack configuration and the union that parses any PEFT config from JSON."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from d9d.peft.full_tune.config import FullTuneConfig
from d9d.peft.lora.config import LoRAConfig


class PeftStackConfig(BaseModel):
    """Several methods applied in order (stacks may nest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["stack"] = "stack"
    methods: list["AnyPeftConfig"] = Field(min_length=1)


AnyPeftConfig = Annotated[LoRAConfig | FullTuneConfig | PeftStackConfig, Field(discriminator="kind")]

PeftStackConfig.model_rebuild()
