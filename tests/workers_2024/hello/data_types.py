"""The hello worker's payload: the LLM API's fields, with a from_json_msg of its own."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from pyworker import ApiPayload, JsonDataException

VOCABULARY = "river stone cloud lamp orchard violin harbor ember meadow copper".split()


@dataclasses.dataclass
class InputData(ApiPayload):
    prompt: str
    max_response_tokens: int

    @classmethod
    def for_test(cls) -> InputData:
        return cls(prompt=" ".join(random.choices(VOCABULARY, k=64)), max_response_tokens=8)

    def generate_payload_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count_workload(self) -> float:
        return float(len(self.prompt.split()))  # a prompt that is no string: AttributeError

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> InputData:
        names = [field.name for field in dataclasses.fields(cls)]
        missing = {name: "missing parameter" for name in names if name not in json_msg}
        if missing:
            raise JsonDataException(missing)
        return cls(**{name: json_msg[name] for name in names})
