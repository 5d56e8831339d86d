"""The media worker's payload: an audio clip to transcribe, with nested decoding options."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from pyworker import ApiPayload, JsonDataException


@dataclasses.dataclass
class DecodeOptions:
    language: str = "auto"
    beam_size: int = 1


@dataclasses.dataclass
class AudioData(ApiPayload):
    audio_url: str
    duration_s: float
    options: DecodeOptions = dataclasses.field(default_factory=DecodeOptions)

    @classmethod
    def for_test(cls) -> AudioData:
        return cls.of_duration(30)

    @classmethod
    def of_duration(cls, seconds: float) -> AudioData:
        clip = random.randint(1, 10**6)
        return cls(audio_url=f"https://example.com/clip{clip}.wav", duration_s=float(seconds))

    def generate_payload_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count_workload(self) -> float:
        return self.duration_s * self.options.beam_size

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> AudioData:
        errors: dict[str, str] = {}
        if not isinstance(json_msg.get("audio_url"), str):
            errors["audio_url"] = "missing parameter"
        duration = json_msg.get("duration_s")
        if not isinstance(duration, (int, float)) or duration <= 0:
            errors["duration_s"] = "expected a positive number of seconds"
        if errors:
            raise JsonDataException(errors)
        options = DecodeOptions(**json_msg.get("options", {}))  # unknown keys: TypeError
        return cls(
            audio_url=json_msg["audio_url"],
            duration_s=float(json_msg["duration_s"]),
            options=options,
        )
