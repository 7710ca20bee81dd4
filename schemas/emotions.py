"""What emotion2vec takes and gives, defined once for every module: its input rate and its classes.

The classes are the symbols of the ``Emotion`` enum in ``emotion_event.avsc``, the contract every consumer
reads, in the model's output order (its tokens.txt: angry, disgusted, fearful, happy, neutral, other, sad,
surprised, ``<unk>``); :func:`emofleet.processors.model.load_model` refuses a model whose tokens differ.
Import-light on purpose (the codec's schema files, no model or Kafka code): the CLI's light commands use it.
"""

from __future__ import annotations

from emofleet.schemas.codec import load_schema

SAMPLE_RATE = 16_000
"""emotion2vec's input: mono samples at 16 kHz."""


def _enum_symbols(schema_name: str, field_name: str) -> tuple[str, ...]:
    field = next(f for f in load_schema(schema_name)["fields"] if f["name"] == field_name)
    return tuple(field["type"]["symbols"])


EMOTIONS: tuple[str, ...] = _enum_symbols("emotion_event", "label")
"""The nine classes in model output order: index ``i`` of a score vector is ``EMOTIONS[i]``."""

NEGATIVE_LABELS: tuple[str, ...] = ("angry", "disgusted", "fearful", "sad")
"""Labels counted as negative (negativity = share of clips with one of these labels), in EMOTIONS order."""
