"""Prototype: a schema-specialised Avro encoder, to size the fix for the producer's encode cost.

    python bench/avro_fastpath.py [--references 50000]

``SingleObjectCodec.encode`` runs fastavro's ``validate`` and then ``schemaless_writer``: two
generic walks of the schema per record (~4 us + ~6 us for an AudioReference here, most of it
resolving the ``["null", "string"]`` unions). This module compiles a parsed schema once into Python
source with one straight-line function per record type that type-checks and writes in the same pass,
and checks that it is byte-for-byte identical to the codec on the benchmark's references and on
EmotionEvents. It is a measurement aid for bench/README.md, not production code: the real fix
belongs in emofleet/schemas/codec.py (see the README).

Validation it does (what the codec's validate + strict_allow_default writer reject): wrong types
(bool is not an int, int/long range, float/double take int or float, strings must be str), unknown
fields, missing fields without a default, enum symbols, map keys that are not strings.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LONG_MIN, LONG_MAX = -(1 << 63), (1 << 63) - 1
_MISSING = object()


class EncodeError(ValueError):
    pass


def _write_long(buf: bytearray, value: int) -> None:
    z = (value << 1) ^ (value >> 63)
    while z > 0x7F:
        buf.append((z & 0x7F) | 0x80)
        z >>= 7
    buf.append(z)


class _Compiler:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "Mapping": Mapping, "Sequence": Sequence, "EncodeError": EncodeError, "_wl": _write_long,
            "_MISSING": _MISSING, "_pf": struct.Struct("<f").pack, "_pd": struct.Struct("<d").pack,
            "INT_MIN": INT_MIN, "INT_MAX": INT_MAX, "LONG_MIN": LONG_MIN, "LONG_MAX": LONG_MAX,
        }
        self.named: dict[str, Any] = {}
        self.functions: dict[str, str] = {}
        self._counter = 0

    def fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}{self._counter}"

    def function_for(self, schema: Any) -> str:
        """Name of a generated ``f(buf, value, path)`` writing ``schema``."""
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        key = schema["name"] if isinstance(schema, dict) and "name" in schema else None
        if key and key in self.functions:
            return self.functions[key]
        name = self.fresh("w")
        if key:
            self.functions[key] = name
            self.named[key] = schema
        body: list[str] = []
        self.emit(schema, "v", body, 1, "path")
        self.lines.append(f"def {name}(buf, v, path):")
        self.lines += body or ["    pass"]
        return name

    def emit(self, schema: Any, var: str, out: list[str], depth: int, path: str) -> None:
        pad = "    " * depth
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        kind = schema if isinstance(schema, str) else schema["type"] if isinstance(schema, dict) else "union"
        if isinstance(schema, dict) and kind in ("string", "long", "int", "float", "double", "boolean",
                                                  "bytes", "null"):
            kind = schema["type"]  # primitives with attributes (logicalType): written as the base type
        if kind == "null":
            out.append(f"{pad}if {var} is not None: raise EncodeError(f'{{{path}}}: expected null')")
        elif kind == "string":
            b = self.fresh("b")
            out += [f"{pad}if not isinstance({var}, str): raise EncodeError(f'{{{path}}}: expected a string')",
                    f"{pad}{b} = {var}.encode()",
                    f"{pad}if len({b}) < 64: buf.append(len({b}) << 1)",
                    f"{pad}else: _wl(buf, len({b}))",
                    f"{pad}buf += {b}"]
        elif kind == "bytes":
            out += [f"{pad}if not isinstance({var}, (bytes, bytearray)): "
                    f"raise EncodeError(f'{{{path}}}: expected bytes')",
                    f"{pad}_wl(buf, len({var})); buf += {var}"]
        elif kind in ("long", "int"):
            lo, hi = ("INT_MIN", "INT_MAX") if kind == "int" else ("LONG_MIN", "LONG_MAX")
            out += [f"{pad}if not isinstance({var}, int) or {var} is True or {var} is False or "
                    f"not {lo} <= {var} <= {hi}: raise EncodeError(f'{{{path}}}: expected an Avro {kind}')",
                    f"{pad}_wl(buf, {var})"]
        elif kind in ("float", "double"):
            out += [f"{pad}if not isinstance({var}, (int, float)) or {var} is True or {var} is False: "
                    f"raise EncodeError(f'{{{path}}}: expected a number')",
                    f"{pad}buf += {'_pf' if kind == 'float' else '_pd'}({var})"]
        elif kind == "boolean":
            out += [f"{pad}if {var} is True: buf.append(1)",
                    f"{pad}elif {var} is False: buf.append(0)",
                    f"{pad}else: raise EncodeError(f'{{{path}}}: expected a boolean')"]
        elif kind == "enum":
            symbols = self.fresh("syms")
            self.env[symbols] = {s: i for i, s in enumerate(schema["symbols"])}
            self.named.setdefault(schema["name"], schema)
            i = self.fresh("i")
            out += [f"{pad}{i} = {symbols}.get({var}) if isinstance({var}, str) else None",
                    f"{pad}if {i} is None: raise EncodeError(f'{{{path}}}: not a {schema['name']} symbol')",
                    f"{pad}buf.append({i} << 1)" if len(schema["symbols"]) <= 64 else f"{pad}_wl(buf, {i})"]
        elif kind == "union":
            branches = list(schema)
            if len(branches) == 2 and "null" in branches:
                other = branches[1 - branches.index("null")]
                out.append(f"{pad}if {var} is None: buf.append({branches.index('null') << 1})")
                out.append(f"{pad}else:")
                out.append(f"{pad}    buf.append({(1 - branches.index('null')) << 1})")
                self.emit(other, var, out, depth + 1, path)
            else:
                raise NotImplementedError("only [null, T] unions in this prototype")
        elif kind == "array":
            item = self.fresh("x")
            out += [f"{pad}if not isinstance({var}, Sequence) or isinstance({var}, (str, bytes)): "
                    f"raise EncodeError(f'{{{path}}}: expected an array')",
                    f"{pad}if {var}:",
                    f"{pad}    _wl(buf, len({var}))",
                    f"{pad}    for {item} in {var}:"]
            self.emit(schema["items"], item, out, depth + 2, path)
            out.append(f"{pad}buf.append(0)")
        elif kind == "map":
            key, item = self.fresh("k"), self.fresh("x")
            out += [f"{pad}if not isinstance({var}, Mapping): raise EncodeError(f'{{{path}}}: expected a map')",
                    f"{pad}if {var}:",
                    f"{pad}    _wl(buf, len({var}))",
                    f"{pad}    for {key}, {item} in {var}.items():"]
            self.emit("string", key, out, depth + 2, path)
            self.emit(schema["values"], item, out, depth + 2, path)
            out.append(f"{pad}buf.append(0)")
        elif kind == "record":
            name = schema["name"]
            if name in self.functions:
                out.append(f"{pad}{self.functions[name]}(buf, {var}, {path})")
                return
            self.functions[name] = function = self.fresh("rec")
            self.named[name] = schema
            fields = self.fresh("fields")
            self.env[fields] = frozenset(f["name"] for f in schema["fields"])
            # Direct indexing (try is free in 3.11); a field taken from its default lowers the count of
            # keys the record may have, so "len(v) != found" catches unknown fields without a set op.
            body = [f"    if not isinstance(v, Mapping): raise EncodeError(f'{{path}}: expected a record')",
                    f"    found = {len(schema['fields'])}"]
            for field in schema["fields"]:
                fv = self.fresh("f")
                body += ["    try:", f"        {fv} = v[{field['name']!r}]", "    except KeyError:"]
                if "default" in field:
                    default = self.fresh("default")
                    self.env[default] = field["default"]
                    body += [f"        {fv} = {default}", "        found -= 1"]
                else:
                    body.append(f"        raise EncodeError(f'{{path}}.{field['name']}: missing') from None")
                self.emit(field["type"], fv, body, 1, f'path + ".{field["name"]}"')
            body.append(f"    if len(v) != found: raise EncodeError(f'{{path}}: unknown field(s) "
                        f"{{sorted(set(v) - {fields})}}')")
            self.lines.append(f"def {function}(buf, v, path):")
            self.lines += body
            out.append(f"{pad}{function}(buf, {var}, {path})")
        else:
            raise NotImplementedError(f"type {kind!r}")


def compile_encoder(schema: dict[str, Any], header: bytes = b"") -> Callable[[Mapping[str, Any]], bytes]:
    """One function ``encode(record) -> header + Avro body`` for a fastavro-parsed record schema."""
    compiler = _Compiler()
    top: list[str] = []
    compiler.emit(schema, "record", top, 1, '"record"')
    source = "\n".join(compiler.lines) + "\n\ndef encode(record):\n    buf = bytearray(HEADER)\n"
    source += "\n".join(top) + "\n    return bytes(buf)\n"
    env = dict(compiler.env, HEADER=header)
    exec(compile(source, f"<avro encoder {schema.get('name')}>", "exec"), env)  # noqa: S102 - our own source
    return env["encode"]  # type: ignore[no-any-return]


class FastPathCodec:
    """Drop-in for the single-object codec's encode in the producer benchmark; decode delegates."""

    def __init__(self) -> None:
        from emofleet.schemas.codec import _entry, make_codec

        self._codec = make_codec()
        self._encoders = {name: compile_encoder(_entry(name).writer, _entry(name).header)
                          for name in ("audio_reference", "emotion_event")}

    def encode(self, name: str, record: Mapping[str, Any], *, topic: str) -> bytes:
        return self._encoders[name](record)

    def decode(self, name: str, data: bytes, *, topic: str) -> dict[str, Any]:
        return self._codec.decode(name, data, topic=topic)  # type: ignore[arg-type]


def _sample_events(count: int) -> list[dict[str, Any]]:
    import numpy as np

    from emofleet.processors.events import ClipResult, Lineage, ModelIdentity, emotion_events
    from emofleet.processors.prediction import Prediction
    from emofleet.streams.references import make_reference

    rng = np.random.default_rng(0)
    identity = ModelIdentity("iic/emotion2vec_plus_large", "sha256:abc", "utterance", False)
    events = []
    for i in range(count):
        scores = rng.dirichlet(np.ones(9)).astype(np.float32)
        embedding = rng.standard_normal(16).astype(np.float32) if i % 3 == 0 else None
        frames = rng.dirichlet(np.ones(9), size=4).astype(np.float32) if i % 5 == 0 else None
        prediction = Prediction(scores, "happy", float(scores.max()), embedding, frames)
        reference = make_reference({"uri": f"s3://b/{i}.wav", "tenant": "t" if i % 2 else None,
                                    "attributes": {"a": "b"} if i % 2 else {}}, now_ms=1_790_000_000_000)
        windows = ((0.0, 30.0), (30.0, 41.5)) if i % 7 == 0 else ((0.0, 4.2),)
        result = ClipResult(windows, (prediction,) * len(windows))
        events += emotion_events(reference, Lineage("t", i % 4, i), "ab" * 32, result, identity,
                                 cache_hit=bool(i % 2), processed_at_ms=1_790_000_000_500, latency_ms=12)
    return events


def main() -> None:
    from emofleet.schemas.codec import SchemaError, make_codec

    from producer import references

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=50_000)
    args = parser.parse_args()
    codec, fast = make_codec(), FastPathCodec()
    samples = {"audio_reference": references(args.references), "emotion_event": _sample_events(2_000)}
    rows = []
    for name, records in samples.items():
        for record in records:  # byte-for-byte equal to the real codec
            assert fast.encode(name, record, topic="x") == codec.encode(name, record, topic="x"), record
        timings = {}
        for label, encoder in (("codec", codec), ("fastpath", fast)):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for record in records:
                    encoder.encode(name, record, topic="x")
                best = min(best, time.perf_counter() - started)
            timings[label] = best / len(records) * 1e6
        rows.append((name, len(records), timings["codec"], timings["fastpath"], timings["codec"] / timings["fastpath"]))
    # Rejections the real codec makes must be rejected too.
    bad = [{**samples["audio_reference"][0], "produced_at": True},
           {**samples["audio_reference"][0], "nope": 1},
           {k: v for k, v in samples["audio_reference"][0].items() if k != "uri"},
           {**samples["audio_reference"][0], "attributes": {"a": 1}},
           {**samples["audio_reference"][0], "tenant": 5}]
    for record in bad:
        for encoder, error in ((codec, SchemaError), (fast, EncodeError)):
            try:
                encoder.encode("audio_reference", record, topic="x")
            except error:
                continue
            raise AssertionError(f"{type(encoder).__name__} accepted {record}")
    print("| schema | records | codec.encode us | compiled encoder us | speed-up |\n|---|---|---|---|---|")
    for name, count, slow, quick, ratio in rows:
        print(f"| {name} | {count} | {slow:.2f} | {quick:.2f} | {ratio:.1f}x |")
    print("\nOutputs byte-identical on every record; the 5 invalid records are rejected by both.")


if __name__ == "__main__":
    main()
