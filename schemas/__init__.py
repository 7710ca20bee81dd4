"""Avro contracts of emofleet's topics (``*.avsc``, history in ``history/``) and the codec for them.

See ``README.md`` here for the evolution rules and :mod:`emofleet.schemas.codec` for the wire formats.
"""

from emofleet.schemas.codec import (
    SCHEMA_NAMES,
    Codec,
    SchemaError,
    SchemaName,
    load_schema,
    make_codec,
    schema_versions,
)

__all__ = ["SCHEMA_NAMES", "Codec", "SchemaError", "SchemaName", "load_schema", "make_codec", "schema_versions"]
