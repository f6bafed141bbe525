"""Deterministic answers: what the fake's "model" says, for real-time calls and batch lines.

Plain generation echoes the last user message (`"echo: " + its first 60 characters`).
Structured requests (OpenAI `response_format` json_schema/json_object or a forced function
tool; Anthropic a forced `tool_choice`) get a JSON value that validates against the schema,
chosen by hash of the prompt; `invalid_rate` of them deliberately do not, unless the last user
message quotes a validation error (a repair), which always gets a valid answer.

Each `answer_*` returns (HTTP status, body); errors are in the provider's error shape, so a
batch line carries the same body a real-time call would.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import jsonschema
import orjson

from overnight.testing.fake_state import Ids, ProviderError

MAX_DEPTH = 6  # past this, optional parts of recursive schemas are left out
NOT_FOUND_MODEL = "missing-model"  # the one model name that does not exist


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def tokens(text: str) -> int:
    """A rough token count (about four characters a token), never zero."""
    return len(text) // 4 + 1


def text_of(content: Any) -> str:
    """The text in a message's content: a string, or a list of content blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return "" if content is None else str(content)
    parts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") in ("text", "input_text"):
            parts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_result":  # an Anthropic repair quotes the error here
            parts.append(text_of(block.get("content")))
    return " ".join(parts)


def last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return text_of(m.get("content"))
    return ""


def prompt_of(body: Any) -> str:
    """What a request asks, for counting (Stats.prompts): the last user message of a chat or
    Anthropic message, an embedding's input."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("messages"), list):
        return last_user_text(body["messages"])
    return text_of(body.get("input")) if not isinstance(body.get("input"), str) else body["input"]


# -- values valid against a JSON schema ---------------------------------------------------


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    """Follow local $refs (pydantic puts models under $defs)."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 32:
        ref, seen = schema["$ref"], seen + 1
        if not ref.startswith("#"):
            return {}
        node: Any = root
        for part in filter(None, ref[1:].split("/")):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        # Keywords beside a $ref (a description, a default) apply too.
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _merge_all_of(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        part = _resolve(part, root)
        if "allOf" in part:
            part = _merge_all_of(part, root)
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def instance(schema: Any, seed: str, root: Any = None, depth: int = 0) -> Any:
    """A value valid against `schema`, chosen deterministically from `seed`.

    Covers what structured-output schemas use: objects (every property), arrays, enum and
    const, anyOf/oneOf (first branch), allOf (merged), $ref into $defs, type lists, string
    formats and length bounds, numeric bounds and multipleOf. `pattern` is not honoured."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if depth > 8 * MAX_DEPTH:  # a recursion with no way out: no valid value exists anyway
        return None
    if schema is True or not isinstance(schema, dict):
        return f"value {digest(seed) % 1000}"
    if "allOf" in schema:
        return instance(_merge_all_of(schema, root), seed, root, depth)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][digest(seed) % len(schema["enum"])]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            branches = [_resolve(b, root) for b in schema[key]]
            deep = depth > MAX_DEPTH and any(_is_null(b) for b in branches)
            branch = next(b for b in branches if _is_null(b)) if deep else branches[0]
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            return instance(
                {**rest, **branch} if isinstance(branch, dict) else branch, seed, root, depth
            )
    kind = schema.get("type")
    if isinstance(kind, list):
        real = [k for k in kind if k != "null"]
        kind = "null" if not real or (depth > MAX_DEPTH and "null" in kind) else real[0]
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    n = digest(seed)
    if kind == "object":
        return _object(schema, seed, root, depth)
    if kind == "array":
        return _array(schema, seed, root, depth)
    if kind == "string":
        return _string(schema, n)
    if kind == "integer":
        return _integer(schema, n)
    if kind == "number":
        return _number(schema, n)
    if kind == "boolean":
        return bool(n % 2)
    if kind == "null":
        return None
    return f"value {n % 1000}"  # no type: anything goes


def _object(schema: dict[str, Any], seed: str, root: Any, depth: int) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    names = list(props) if depth <= MAX_DEPTH else [p for p in props if p in required]
    out = {k: instance(props[k], f"{seed}/{k}", root, depth + 1) for k in names}
    for k in required - set(out):  # required but not described: any value will do
        out[k] = f"value {digest(f'{seed}/{k}') % 1000}"
    extra = schema.get("additionalProperties")
    i = 0
    while len(out) < int(schema.get("minProperties", 0)):
        value = instance(extra, f"{seed}/+{i}", root, depth + 1) if extra else "value"
        out[f"key{i}"], i = value, i + 1
    return out


def _array(schema: dict[str, Any], seed: str, root: Any, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems") or []
    out = [instance(s, f"{seed}/{i}", root, depth + 1) for i, s in enumerate(prefix)]
    items = schema.get("items")
    want = max(int(schema.get("minItems", 0)), len(out) + (1 if depth <= MAX_DEPTH else 0))
    if "maxItems" in schema:
        want = min(want, int(schema["maxItems"]))
    if items is False:
        return out
    while len(out) < want:
        out.append(instance(items or {}, f"{seed}/{len(out)}", root, depth + 1))
    return out[: max(want, len(prefix))]


_FORMATS: dict[str, Callable[[int], str]] = {
    "date-time": lambda n: f"2024-0{n % 9 + 1}-1{n % 10}T12:00:00Z",
    "date": lambda n: f"2024-0{n % 9 + 1}-1{n % 10}",
    "time": lambda n: f"12:{n % 60:02d}:00Z",
    "duration": lambda n: f"PT{n % 60 + 1}M",
    "email": lambda n: f"user{n % 1000}@example.com",
    "hostname": lambda n: f"host{n % 1000}.example.com",
    "ipv4": lambda n: f"192.0.2.{n % 250 + 1}",
    "ipv6": lambda n: f"2001:db8::{n % 65535:x}",
    "uri": lambda n: f"https://example.com/{n % 1000}",
    "uri-reference": lambda n: f"https://example.com/{n % 1000}",
    "uuid": lambda n: str(uuid.UUID(int=n << 64 | n)),
}


def _string(schema: dict[str, Any], n: int) -> str:
    fmt = _FORMATS.get(str(schema.get("format")))
    text = fmt(n) if fmt else f"value {n % 1000}"
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = text.ljust(lo, "x")
    return text if hi is None else text[: int(hi)]


def _range(schema: dict[str, Any], width: float) -> tuple[float, float]:
    """The closed range to pick from; exclusive bounds are avoided by the callers."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if low is None:
        low = 0 if high is None or high >= width else high - width
    if high is None:
        high = low + width
    return low, high


def _integer(schema: dict[str, Any], n: int) -> int:
    low, high = _range(schema, 99)
    first = math.floor(low) + 1 if "exclusiveMinimum" in schema else math.ceil(low)
    last = math.ceil(high) - 1 if "exclusiveMaximum" in schema else math.floor(high)
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0:
        first = -(-first // step) * step
        return first + step * (n % max(1, (last - first) // step + 1))
    return first + n % max(1, last - first + 1)


def _number(schema: dict[str, Any], n: int) -> float:
    low, high = _range(schema, 50)
    step = schema.get("multipleOf")
    if step:
        k = math.ceil(low / step)
        if "exclusiveMinimum" in schema and k * step <= low:
            k += 1
        # A float multiple must divide back exactly (0.3 / 0.1 is not 3.0): try a few.
        candidates = [round(j * step, 12) for j in range(k, k + 50)]
        fits = [v for v in candidates if v / step == int(v / step) and v <= high]
        return float(fits[0] if fits else candidates[0])
    return float(low + (high - low) * (n % 99 + 1) / 100)  # strictly inside the bounds


# -- deliberately invalid answers ---------------------------------------------------------


def _wrong(schema: Any, root: dict[str, Any]) -> Any:
    """A value of the wrong type for `schema`."""
    schema = _resolve(schema, root)
    kind = schema.get("type") if isinstance(schema, dict) else None
    return "not an object" if kind == "object" else {"unexpected": ["structure"]}


def invalid_instance(schema: dict[str, Any], seed: str) -> Any:
    """A value that does NOT validate (when the schema can reject anything): a valid one with
    a property of the wrong type, or a required one missing, or an extra one."""
    valid = instance(schema, seed)
    top = _resolve(schema, schema)
    if isinstance(top, dict) and "allOf" in top:
        top = _merge_all_of(top, schema)
    candidates: list[Any] = []
    if isinstance(valid, dict) and isinstance(top, dict):
        props = top.get("properties") or {}
        required = [k for k in top.get("required") or [] if k in valid]
        for key in [*required, *[k for k in props if k not in required]]:
            candidates.append({**valid, key: _wrong(props.get(key, {}), schema)})
        if required:
            candidates.append({k: v for k, v in valid.items() if k != required[0]})
        candidates.append({**valid, "unexpected": "field"})
    candidates.append({"unexpected": "field"})
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        return next((c for c in candidates if not validator.is_valid(c)), candidates[-1])
    except jsonschema.exceptions.SchemaError:
        return candidates[0]


def breaks(prompt: str, invalid_rate: float) -> bool:
    """Whether the structured answer to `prompt` is broken: `invalid_rate` of prompts (by
    hash), never a repair (a prompt that quotes a validation error)."""
    lowered = prompt.lower()
    if "invalid" in lowered or "validation" in lowered:
        return False
    return invalid_rate > 0 and digest(prompt) % 10_000 < invalid_rate * 10_000


def structured(schema: dict[str, Any], prompt: str, invalid_rate: float) -> Any:
    if breaks(prompt, invalid_rate):
        return invalid_instance(schema, prompt)
    return instance(schema, prompt)


# -- OpenAI -------------------------------------------------------------------------------


def _openai_checks(body: dict[str, Any], *fields: str) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ProviderError(
            400, "you must provide a model parameter", code="missing_required_parameter"
        )
    for name in fields:
        if body.get(name) in (None, [], ""):
            raise ProviderError(
                400,
                f"Missing required parameter: '{name}'.",
                code="missing_required_parameter",
                param=name,
            )
    if body.get("stream"):
        raise ProviderError(400, "stream=true is not supported by the fake", param="stream")
    if body["model"] == NOT_FOUND_MODEL:
        raise ProviderError(
            404,
            f"The model `{NOT_FOUND_MODEL}` does not exist or you do not have access to it.",
            code="model_not_found",
        )


def _truncate(text: str, limit: Any) -> tuple[str, bool]:
    if isinstance(limit, int) and limit > 0 and tokens(text) > limit:
        return text[: 4 * limit - 1], True  # tokens() of the rest is `limit`
    return text, False


def answer_chat(body: dict[str, Any], *, invalid_rate: float, ids: Ids) -> tuple[int, dict]:
    """POST /v1/chat/completions."""
    try:
        _openai_checks(body, "messages")
        messages = body["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") for m in messages
        ):
            raise ProviderError(
                400, "Invalid 'messages': a list of {role, content}", param="messages"
            )
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
            raise ProviderError(
                400,
                "Missing required parameter: 'response_format.json_schema'.",
                param="response_format.json_schema",
                code="missing_required_parameter",
            )
    except ProviderError as exc:
        return exc.status, exc.body("openai")
    prompt = last_user_text(messages)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    tool = _forced_function(body)
    choices, pout = [], 0
    for i in range(max(1, int(body.get("n") or 1))):
        seed = prompt if i == 0 else f"{prompt}#{i}"
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        finish = "stop"
        if tool is not None:
            params = tool.get("parameters") or {"type": "object"}
            args = orjson.dumps(structured(params, seed, invalid_rate)).decode()
            message["tool_calls"] = [
                {
                    "id": ids.new("call_"),
                    "type": "function",
                    "function": {"name": tool.get("name"), "arguments": args},
                }
            ]
            finish = "tool_calls" if body.get("tool_choice") == "required" else "stop"
            out = args
        elif fmt.get("type") in ("json_schema", "json_object"):
            # llama.cpp-style servers take `{type: json_object, schema}`; accept both.
            schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema")
            if schema:
                out = orjson.dumps(structured(schema, seed, invalid_rate)).decode()
            else:  # json_object: any JSON object; a broken one is not JSON at all
                answer = orjson.dumps({"answer": "echo: " + seed[:60]}).decode()
                out = "Sure! Here it is: {" if breaks(seed, invalid_rate) else answer
            message["content"] = out
        else:
            out, cut = _truncate("echo: " + seed[:60], limit)
            message["content"], finish = out, "length" if cut else "stop"
        choices.append({"index": i, "finish_reason": finish, "logprobs": None, "message": message})
        pout += tokens(out)
    pin = sum(tokens(text_of(m.get("content"))) + 4 for m in messages)
    return 200, {
        "id": ids.new("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": pin,
            "completion_tokens": pout,
            "total_tokens": pin + pout,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
    }


def _forced_function(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function an OpenAI request forces (`tool_choice` required or named), if any."""
    tools = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "none"):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return next((t for t in tools if t.get("name") == name), tools[0])
    return tools[0]


def answer_embeddings(body: dict[str, Any]) -> tuple[int, dict]:
    """POST /v1/embeddings: unit vectors from a hash of each input (8 dimensions unless
    `dimensions`), as floats or, with encoding_format=base64, packed float32."""
    try:
        _openai_checks(body, "input")
        inputs = body["input"]
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            texts = [inputs]  # one input given as token ids
        dim = body.get("dimensions") or 8
        fmt = body.get("encoding_format") or "float"
        if not isinstance(dim, int) or dim < 1:
            raise ProviderError(400, "dimensions must be a positive integer", param="dimensions")
        if fmt not in ("float", "base64"):
            raise ProviderError(
                400, "encoding_format: 'float' or 'base64'", param="encoding_format"
            )
    except ProviderError as exc:
        return exc.status, exc.body("openai")
    data = []
    for i, text in enumerate(texts):
        rng = random.Random(digest(str(text)))
        vec = [rng.gauss(0, 1) for _ in range(dim)]
        norm = sum(v * v for v in vec) ** 0.5 or 1.0
        unit = [v / norm for v in vec]
        embedding: Any = (
            base64.b64encode(array.array("f", unit).tobytes()).decode() if fmt == "base64" else unit
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    used = sum(tokens(str(t)) for t in texts)
    return 200, {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


# -- Anthropic ----------------------------------------------------------------------------


def answer_message(body: dict[str, Any], *, invalid_rate: float, ids: Ids) -> tuple[int, dict]:
    """POST /v1/messages."""
    try:
        for name in ("model", "messages", "max_tokens"):
            if body.get(name) in (None, "", []):
                raise ProviderError(400, f"{name}: Field required")
        messages = body["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in messages
        ):
            raise ProviderError(400, "messages: each needs role user or assistant, and content")
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            raise ProviderError(400, "max_tokens: Input should be greater than or equal to 1")
        if body.get("stream"):
            raise ProviderError(400, "stream: streaming is not supported by the fake")
        if body["model"] == NOT_FOUND_MODEL:
            raise ProviderError(404, f"model: {NOT_FOUND_MODEL}")
    except ProviderError as exc:
        return exc.status, exc.body("anthropic")
    prompt = last_user_text(messages)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice") or {}
    stop = "end_turn"
    if tools and choice.get("type") in ("tool", "any"):
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
        value = structured(tool.get("input_schema") or {"type": "object"}, prompt, invalid_rate)
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": ids.new("toolu_"), "name": tool.get("name"), "input": value}
        ]
        out_tokens, stop = tokens(orjson.dumps(value).decode()), "tool_use"
    else:
        text, cut = _truncate("echo: " + prompt[:60], body["max_tokens"])
        content, out_tokens = [{"type": "text", "text": text}], tokens(text)
        stop = "max_tokens" if cut else "end_turn"
    pin = tokens(text_of(body.get("system") or ""))  # the system prompt, even when empty
    pin += sum(tokens(text_of(m.get("content"))) + 4 for m in messages)
    return 200, {
        "id": ids.new("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": pin,
            "output_tokens": out_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
