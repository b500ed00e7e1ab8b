"""docs/asyncapi.yaml says what warmer/contract.py and warmer/bus/topology.py do.

Every wire Struct has a schema of the same name whose property names, required list,
JSON types, limits and nested objects are those msgspec derives from the Struct; every
tagged Struct is a message and every message a Struct; every channel carries exactly
its stream's union; every example is valid for both the contract and the document, and
the two accept and refuse the same bodies at the limits; the exchanges, queues and
bindings are those of ``definitions``. A change on either side that the other does not
follow fails here. ``_problems`` checks a value against the document's schemas (the
JSON Schema keywords it uses), since no JSON Schema validator is a dependency.

"Required" means what a reader of the wire can rely on: for what the worker receives, a
field without a default (the sender must give it); for what the worker sends, a field
it always writes (all but those that can be ``UNSET``, such as ``ok`` of a reply, which
has a default and is always there).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
import yaml
from msgspec import UNSET, Struct

from warmer import contract
from warmer.bus.topology import definitions
from warmer.core import Conversation, Hold, Policy
from warmer.core.economy import Economy
from warmer.core.panel import DEFAULT_PANEL, build_panel

SPEC_FILE = Path(__file__).parents[2] / "docs" / "asyncapi.yaml"
REF = "#/components/schemas/{name}"

# What the worker decodes and what it encodes; everything on the wire hangs off these.
INBOUND: list[Any] = [contract.LifecycleEvent, contract.Command]
# ``Reply`` is an untagged union (the requester knows what it asked): one type at a time.
OUTBOUND: list[Any] = [contract.WarmRequested, contract.SurfaceChanged, *get_args(contract.Reply)]
# Structs of contract.py that never go on the wire.
INTERNAL = {contract.Rejection, contract.UnknownType}

_, INBOUND_SCHEMAS = msgspec.json.schema_components(INBOUND, ref_template=REF)
_, OUTBOUND_SCHEMAS = msgspec.json.schema_components(OUTBOUND, ref_template=REF)
DERIVED: dict[str, Any] = {**INBOUND_SCHEMAS, **OUTBOUND_SCHEMAS}

LIMITS = ("minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "pattern")
JSON_TYPES = {
    bool: "boolean",
    str: "string",
    int: "integer",
    float: "number",
    type(None): "null",
    dict: "object",
    list: "array",
}

# The stream each channel carries, as the union the worker decodes or encodes.
CHANNELS: dict[str, Any] = {
    "lifecycle": contract.LifecycleEvent,
    "commands": contract.Command,
    "commandReplies": contract.Reply,
    "warm": contract.WarmRequested,
    "surface": contract.SurfaceChanged,
}


def _wire_structs() -> dict[str, type[Struct]]:
    """Every public Struct defined in contract.py, except the internal ones."""
    return {
        name: obj
        for name, obj in vars(contract).items()
        if inspect.isclass(obj)
        and issubclass(obj, Struct)
        and obj.__module__ == contract.__name__
        and not name.startswith("_")
        and obj not in INTERNAL
    }


WIRE = _wire_structs()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def schemas(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["schemas"]  # type: ignore[no-any-return]


def _resolve(ref: str, document: dict[str, Any]) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _schema_name(ref: str) -> str:
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    return ref.removeprefix(prefix)


def _is_object(schema: dict[str, Any]) -> bool:
    return "properties" in schema


def _types(schema: dict[str, Any], components: dict[str, Any]) -> frozenset[str]:
    """The JSON types a property schema admits (empty: any)."""
    if "$ref" in schema:
        target = components[_schema_name(schema["$ref"])]
        return frozenset({"object"}) if _is_object(target) else _types(target, components)
    found: set[str] = set()
    if "type" in schema:
        kind = schema["type"]
        found.update([kind] if isinstance(kind, str) else kind)
    elif "anyOf" in schema or "oneOf" in schema:
        for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
            found |= _types(branch, components)
    elif "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        found.update(JSON_TYPES[type(value)] for value in values)
    if "number" in found:
        found.discard("integer")
    return frozenset(found)


def _limits(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, set[Any]]:
    """The limits and allowed values a property schema states, through unions and aliases."""
    found: dict[str, set[Any]] = {}
    if "$ref" in schema:
        target = components[_schema_name(schema["$ref"])]
        return {} if _is_object(target) else _limits(target, components)
    for keyword in LIMITS:
        if keyword in schema:
            found.setdefault(keyword, set()).add(schema[keyword])
    if "enum" in schema:
        found.setdefault("enum", set()).add(frozenset(schema["enum"]))
    if "const" in schema:
        found.setdefault("enum", set()).add(frozenset([schema["const"]]))
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        for keyword, values in _limits(branch, components).items():
            found.setdefault(keyword, set()).update(values)
    return found


def _object_refs(schema: Any, components: dict[str, Any]) -> set[str]:
    """The object schemas a property schema points to, anywhere inside it."""
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and _is_object(components[_schema_name(ref)]):
            found.add(_schema_name(ref))
        for value in schema.values():
            found |= _object_refs(value, components)
    elif isinstance(schema, list):
        for value in schema:
            found |= _object_refs(value, components)
    return found


def _wire_names(struct: type[Struct]) -> list[str]:
    """The Struct's field names as they are on the wire, the tag field first."""
    config = struct.__struct_config__
    names = [config.tag_field] if config.tag_field else []
    return names + [f.encode_name for f in msgspec.structs.fields(struct)]


def _wire_required(struct: type[Struct]) -> set[str]:
    config = struct.__struct_config__
    required = {config.tag_field} if config.tag_field else set()
    for info in msgspec.structs.fields(struct):
        if struct.__name__ in INBOUND_SCHEMAS or config.omit_defaults:
            if info.required:
                required.add(info.encode_name)
        elif info.default is not UNSET:
            required.add(info.encode_name)
    return required


def _members(union: Any) -> set[str]:
    return {member.__name__ for member in (get_args(union) or (union,))}


# -- the document ---------------------------------------------------------------------


def test_the_document_is_asyncapi_3_for_warmer_1(spec: dict[str, Any]) -> None:
    assert spec["asyncapi"] == "3.0.0"
    assert spec["info"]["title"] == "warmer"
    assert spec["info"]["version"] == "1.0.0"
    assert spec["info"]["description"]
    assert spec["servers"]["rabbitmq"]["protocol"] == "amqp"


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    refs = _all_refs(spec)
    assert refs
    for ref in refs:
        _resolve(ref, spec)


def _all_refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _all_refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_all_refs(value) for value in node)) if node else set()
    return set()


# -- schemas against the Structs ------------------------------------------------------


def test_every_wire_struct_is_sent_or_received() -> None:
    # A Struct that is in neither direction's union is on no stream: add it to one.
    enums = {name for name, schema in DERIVED.items() if "enum" in schema}  # e.g. Status
    assert set(WIRE) == set(DERIVED) - enums
    assert not set(INBOUND_SCHEMAS) & set(OUTBOUND_SCHEMAS)


def test_every_wire_struct_has_a_schema(schemas: dict[str, Any]) -> None:
    missing = set(WIRE) - set(schemas)
    assert not missing, f"no schema in docs/asyncapi.yaml for {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(WIRE))
def test_property_names_are_the_wire_names(name: str, schemas: dict[str, Any]) -> None:
    struct = WIRE[name]
    assert set(DERIVED[name]["properties"]) == set(_wire_names(struct))  # msgspec agrees
    assert set(schemas[name]["properties"]) == set(_wire_names(struct))


@pytest.mark.parametrize("name", sorted(WIRE))
def test_required_is_what_the_wire_always_has(name: str, schemas: dict[str, Any]) -> None:
    assert set(schemas[name].get("required", [])) == _wire_required(WIRE[name])


@pytest.mark.parametrize("name", sorted(WIRE))
def test_property_types_are_the_struct_types(name: str, schemas: dict[str, Any]) -> None:
    derived, documented = DERIVED[name]["properties"], schemas[name]["properties"]
    for prop, schema in derived.items():
        assert _types(documented[prop], schemas) == _types(schema, DERIVED), f"{name}.{prop}"


@pytest.mark.parametrize("name", sorted(WIRE))
def test_nested_objects_are_the_struct_types(name: str, schemas: dict[str, Any]) -> None:
    derived, documented = DERIVED[name]["properties"], schemas[name]["properties"]
    for prop, schema in derived.items():
        expected = _object_refs(schema, DERIVED)
        assert _object_refs(documented[prop], schemas) == expected, f"{name}.{prop}"


@pytest.mark.parametrize("name", sorted(WIRE))
def test_every_limit_of_the_struct_is_documented(name: str, schemas: dict[str, Any]) -> None:
    # The document may say more (limits docs/contract.md gives for what the worker sends),
    # never less or otherwise.
    derived, documented = DERIVED[name]["properties"], schemas[name]["properties"]
    for prop, schema in derived.items():
        stated = _limits(documented[prop], schemas)
        for keyword, values in _limits(schema, DERIVED).items():
            assert stated.get(keyword) == values, f"{name}.{prop}: {keyword}"


def test_limits_are_the_contract_constants(schemas: dict[str, Any]) -> None:
    conversation_id = schemas["ConversationId"]
    assert conversation_id["maxLength"] == contract.MAX_ID_BYTES
    assert schemas["Usage"]["properties"]["inputTokens"]["maximum"] == contract.MAX_SAFE_INTEGER
    assert schemas["WarmRequested"]["properties"]["token"]["minimum"] == 1
    assert schemas["StateView"]["properties"]["lastError"]["maxLength"] == (
        contract.MAX_ERROR_CHARS
    )
    reason = schemas["DeadLetterHeaders"]["properties"]["x-warmer-error"]
    assert reason["maxLength"] == contract.MAX_ERROR_CHARS


# -- messages and tags ----------------------------------------------------------------


def _message_payloads(spec: dict[str, Any]) -> dict[str, str]:
    """Message key -> the schema name of its payload (messages with a Struct payload)."""
    return {
        key: _schema_name(message["payload"]["$ref"])
        for key, message in spec["components"]["messages"].items()
        if "$ref" in message["payload"]
    }


def _tag(schema: dict[str, Any], field: str) -> str | None:
    prop = schema["properties"].get(field)
    return None if prop is None else prop.get("const")


def test_messages_and_tagged_structs_match_both_ways(
    spec: dict[str, Any], schemas: dict[str, Any]
) -> None:
    in_contract = {
        struct.__struct_config__.tag: name
        for name, struct in WIRE.items()
        if struct.__struct_config__.tag_field == "type"
    }
    in_document = {
        _tag(schemas[payload], "type"): payload
        for payload in _message_payloads(spec).values()
        if _tag(schemas[payload], "type") is not None
    }
    assert in_document == in_contract


def test_a_message_is_named_by_its_tag(spec: dict[str, Any], schemas: dict[str, Any]) -> None:
    for key, payload in _message_payloads(spec).items():
        tag = _tag(schemas[payload], "type")
        if tag is not None:
            assert spec["components"]["messages"][key]["name"] == tag


def test_panel_field_kinds_match_both_ways(schemas: dict[str, Any]) -> None:
    in_contract = {
        field.__struct_config__.tag: field.__name__ for field in get_args(contract.PanelField)
    }
    items = schemas["Panel"]["properties"]["fields"]["items"]["oneOf"]
    in_document = {
        _tag(schemas[_schema_name(item["$ref"])], "kind"): _schema_name(item["$ref"])
        for item in items
    }
    assert in_document == in_contract


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_a_channel_carries_its_stream(
    channel: str, spec: dict[str, Any], schemas: dict[str, Any]
) -> None:
    messages = spec["channels"][channel]["messages"]
    payloads = {
        _schema_name(_resolve(m["$ref"], spec)["payload"]["$ref"]) for m in messages.values()
    }
    assert payloads == _members(CHANNELS[channel])


def test_every_message_is_on_a_channel(spec: dict[str, Any]) -> None:
    on_channels = {
        message["$ref"]
        for channel in spec["channels"].values()
        for message in channel["messages"].values()
    }
    assert on_channels == {f"#/components/messages/{key}" for key in spec["components"]["messages"]}


def test_operations_use_their_channels_messages(spec: dict[str, Any]) -> None:
    used: set[str] = set()
    for name, operation in spec["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel}/messages/"), name
            used.add(message["$ref"])
        reply = operation.get("reply")
        if reply is not None:
            for message in reply["messages"]:
                assert message["$ref"].startswith(f"{reply['channel']['$ref']}/messages/"), name
                used.add(message["$ref"])
    every = {
        f"#/channels/{channel}/messages/{key}"
        for channel, body in spec["channels"].items()
        for key in body["messages"]
    }
    assert used == every


def test_commands_are_answered_with_the_replies(spec: dict[str, Any]) -> None:
    operation = spec["operations"]["receiveCommand"]
    assert operation["action"] == "receive"
    assert operation["reply"]["channel"]["$ref"] == "#/channels/commandReplies"
    assert spec["channels"]["commandReplies"]["address"] is None


# -- the error codes and the status -----------------------------------------------------


def test_error_codes_are_the_contract_codes(schemas: dict[str, Any]) -> None:
    codes = schemas["ErrorCode"]["enum"]
    assert codes == list(get_args(contract.ErrorCode))
    assert list(schemas["ErrorCode"]["x-enum-descriptions"]) == codes


def test_the_encoding_codes_come_first_and_are_named(schemas: dict[str, Any]) -> None:
    # "The first four are encoding errors": a command failing them is dead-lettered too.
    codes, count = schemas["ErrorCode"]["enum"], len(contract.ENCODING_CODES)
    assert "invalid_properties" in codes
    assert set(codes[:count]) == contract.ENCODING_CODES
    words = {3: "three", 4: "four", 5: "five"}
    assert f"The first {words[count]} are encoding errors" in schemas["ErrorCode"]["description"]


def test_reply_code_and_reason_header_are_error_codes(schemas: dict[str, Any]) -> None:
    code = schemas["ErrorReply"]["properties"]["code"]
    reason = schemas["DeadLetterHeaders"]["properties"]["x-warmer-reason"]
    assert code == reason == {"$ref": "#/components/schemas/ErrorCode"}


def test_statuses_are_the_contract_statuses(schemas: dict[str, Any]) -> None:
    known = next(branch for branch in schemas["Status"]["anyOf"] if "enum" in branch)
    assert known["enum"] == [status.value for status in contract.Status]
    assert "expired" in known["enum"]


def test_every_status_has_a_one_line_meaning(schemas: dict[str, Any]) -> None:
    known = next(branch for branch in schemas["Status"]["anyOf"] if "enum" in branch)
    meanings = known["x-enum-descriptions"]
    assert list(meanings) == known["enum"]
    assert all(meaning and "\n" not in meaning for meaning in meanings.values())
    for status in contract.Status:  # the summary line names each one too
        assert f"`{status.value}`" in schemas["Status"]["description"]


def test_cost_policies_are_the_contract_policies(schemas: dict[str, Any]) -> None:
    policies = list(get_args(contract.CostPolicyName))
    assert schemas["CostPolicy"]["enum"] == policies
    assert list(schemas["CostPolicy"]["x-enum-descriptions"]) == policies
    policy = {"$ref": REF.format(name="CostPolicy")}
    assert policy in schemas["SetPolicy"]["properties"]["policy"]["anyOf"]
    assert schemas["SettingsView"]["properties"]["policy"]["$ref"] == policy["$ref"]
    assert "policy" not in schemas["SettingsView"]["required"]  # only when overridden


def test_set_policy_is_a_command_answered_with_settings(spec: dict[str, Any]) -> None:
    assert spec["components"]["messages"]["setPolicy"]["name"] == "set_policy"
    on_channel = spec["channels"]["commands"]["messages"]["setPolicy"]
    assert on_channel == {"$ref": "#/components/messages/setPolicy"}
    received = spec["operations"]["receiveCommand"]["messages"]
    assert {"$ref": "#/channels/commands/messages/setPolicy"} in received
    examples = spec["components"]["messages"]["setPolicy"]["examples"]
    assert None in {example["payload"]["policy"] for example in examples}  # null restores
    assert "set_policy" in spec["components"]["schemas"]["SettingsReply"]["description"]


# -- examples ---------------------------------------------------------------------------


def _examples(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    payloads = _message_payloads(spec)
    return [
        (key, payloads[key], example["payload"])
        for key, message in spec["components"]["messages"].items()
        if key in payloads
        for example in message.get("examples", [])
    ]


def test_every_struct_message_has_an_example(spec: dict[str, Any]) -> None:
    assert {key for key, _, _ in _examples(spec)} == set(_message_payloads(spec))


def test_every_example_is_valid_for_the_contract(spec: dict[str, Any]) -> None:
    for key, name, payload in _examples(spec):
        body = msgspec.json.encode(payload)
        if name in _members(contract.LifecycleEvent):
            decoded: Any = contract.decode_event(body)
        elif name in _members(contract.Command):
            decoded = contract.decode_command(body)
        else:
            decoded = msgspec.json.decode(body, type=WIRE[name])
        assert type(decoded) is WIRE[name], f"{key}: {decoded!r}"
        # No field the Struct ignores (a misspelt name would be), none it would add.
        assert _without_nulls(msgspec.to_builtins(decoded)) == _without_nulls(payload), key


def test_every_example_is_valid_for_the_document(
    spec: dict[str, Any], schemas: dict[str, Any]
) -> None:
    for key, message in spec["components"]["messages"].items():
        for example in message.get("examples", []):
            assert _problems(example["payload"], message["payload"], schemas) == [], key
            if "headers" in message:
                headers = example.get("headers", {})
                assert _problems(headers, message["headers"], schemas) == [], key


def test_the_panels_the_core_builds_are_valid_for_the_document(schemas: dict[str, Any]) -> None:
    state = contract.StateView(
        enabled=True,
        interval_ms=1000,
        active=False,
        status=contract.Status.RETRYING,
        last_pct=12,
        last_expected_pct=None,
        last_warm_at=None,
        next_warm_at=1767225600000,
        last_error="provider overloaded",
        failures=2,
    )
    panel = {"$ref": REF.format(name="Panel")}
    for built in (build_panel(state), DEFAULT_PANEL):
        assert _problems(msgspec.to_builtins(built), panel, schemas) == []
    view = msgspec.to_builtins(state)
    assert _problems(view, {"$ref": REF.format(name="StateView")}, schemas) == []


def test_the_cost_fields_the_core_appends_are_documented_and_valid(
    schemas: dict[str, Any],
) -> None:
    economy = Economy(Policy(ttl_margin_ms=90_000))
    conversation = Conversation(
        enabled=True,
        interval_ms=240_000,
        idle_since=0,
        policy="budget",
        cache_ttl_ms=300_000,
        prefix_tokens=500,
        hold=Hold.SMALL_PREFIX,
        spent=15_450,
        avoided=64_375,
        missed=1_200,
    )
    extra = economy.fields(conversation)
    labels = [field.label for field in extra]
    assert labels == [
        "Cost policy",
        "Cache lifetime",
        "Effective interval",
        "Not warming",
        "Savings",
    ]
    state = conversation.view()
    assert state.status is contract.Status.IDLE
    built = msgspec.to_builtins(build_panel(state, extra))
    assert _problems(built, {"$ref": REF.format(name="Panel")}, schemas) == []
    described = schemas["Panel"]["description"]
    for label in [*labels, "Advice"]:
        assert f'"{label}"' in described, label
    expired = msgspec.structs.replace(state, status=contract.Status.EXPIRED)
    view = msgspec.to_builtins(expired)
    assert _problems(view, {"$ref": REF.format(name="StateView")}, schemas) == []


def test_the_validator_bites(schemas: dict[str, Any]) -> None:
    schema = {"$ref": REF.format(name="TurnSettled")}
    too_long = {"type": "turn.settled", "conversationId": "c", "cwd": "x" * 4097}
    assert _problems(too_long, schema, schemas)
    assert _problems({"type": "turn.settled"}, schema, schemas)
    assert _problems({"type": "turn.started", "conversationId": "c"}, schema, schemas)
    assert _problems({"type": "turn.settled", "conversationId": "c\n"}, schema, schemas)
    assert _problems({"type": "turn.settled", "conversationId": "c", "seq": -1}, schema, schemas)
    completed = {"$ref": REF.format(name="WarmCompleted")}
    assert _problems({"type": "warm.completed", "conversationId": "c"}, completed, schemas)


# Values at and over the limits: the document and the contract must agree on each.
_ID = "c-1"
_EVENT_TAGS = {m.__struct_config__.tag for m in get_args(contract.LifecycleEvent)}


def _edge(case: str, body: dict[str, Any], valid: bool, *marks: Any) -> Any:
    return pytest.param(body, valid, id=case, marks=marks)


EDGES = [
    _edge(
        "cwd at the limit", {"type": "turn.settled", "conversationId": _ID, "cwd": "x" * 4096}, True
    ),
    _edge("cwd over it", {"type": "turn.settled", "conversationId": _ID, "cwd": "x" * 4097}, False),
    _edge(
        "modelName over",
        {"type": "turn.settled", "conversationId": _ID, "modelName": "m" * 257},
        False,
    ),
    _edge("seq at 2^53-1", {"type": "turn.started", "conversationId": _ID, "seq": 2**53 - 1}, True),
    _edge("seq over 2^53-1", {"type": "turn.started", "conversationId": _ID, "seq": 2**53}, False),
    _edge("seq negative", {"type": "turn.started", "conversationId": _ID, "seq": -1}, False),
    _edge("seq null", {"type": "turn.started", "conversationId": _ID, "seq": None}, True),
    _edge("id 200 chars", {"type": "get_state", "conversationId": "c" * 200}, True),
    _edge("id empty", {"type": "get_state", "conversationId": ""}, False),
    _edge("id with a tab", {"type": "get_state", "conversationId": "c\td"}, False),
    _edge("id with C1", {"type": "get_state", "conversationId": "c\x85d"}, False),
    _edge(
        "id ending in a newline",
        {"type": "get_state", "conversationId": "c\n"},
        False,
    ),
    _edge(
        "token 0",
        {"type": "warm.completed", "conversationId": _ID, "token": 0, "error": "x"},
        False,
    ),
    _edge("error empty", {"type": "warm.completed", "conversationId": _ID, "error": ""}, False),
    _edge("neither usage nor error", {"type": "warm.completed", "conversationId": _ID}, False),
    _edge("enabled null", {"type": "set_enabled", "conversationId": _ID, "enabled": None}, False),
    _edge(
        "interval a string",
        {"type": "set_interval", "conversationId": _ID, "intervalMs": "5"},
        False,
    ),
    _edge(
        "interval negative", {"type": "set_interval", "conversationId": _ID, "intervalMs": -5}, True
    ),
    _edge(
        "interval a float", {"type": "set_interval", "conversationId": _ID, "intervalMs": 1.5}, True
    ),
    _edge(
        "policy adaptive", {"type": "set_policy", "conversationId": _ID, "policy": "adaptive"}, True
    ),
    _edge("policy null", {"type": "set_policy", "conversationId": _ID, "policy": None}, True),
    _edge("policy missing", {"type": "set_policy", "conversationId": _ID}, False),
    _edge(
        "policy unknown", {"type": "set_policy", "conversationId": _ID, "policy": "cheap"}, False
    ),
    _edge(
        "cacheTtlS negative",
        {"type": "turn.settled", "conversationId": _ID, "cacheTtlS": -1},
        False,
    ),
    _edge(
        "usage short",
        {"type": "turn.settled", "conversationId": _ID, "usage": {"inputTokens": 1}},
        False,
    ),
]


@pytest.mark.parametrize(("body", "valid"), EDGES)
def test_the_document_and_the_contract_agree_at_the_limits(
    body: dict[str, Any], valid: bool, spec: dict[str, Any], schemas: dict[str, Any]
) -> None:
    by_tag = {
        _tag(schemas[name], "type"): {"$ref": REF.format(name=name)}
        for name in _message_payloads(spec).values()
    }
    documented = not _problems(body, by_tag[body["type"]], schemas)
    decode = contract.decode_event if body["type"] in _EVENT_TAGS else contract.decode_command
    decoded = decode(msgspec.json.encode(body))
    accepted = not isinstance(decoded, contract.Rejection | contract.UnknownType)
    assert (documented, accepted) == (valid, valid)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _problems(value: Any, schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    """What is wrong with ``value`` for ``schema``: the JSON Schema keywords the document uses."""
    if "$ref" in schema:
        return _problems(value, components[_schema_name(schema["$ref"])], components)
    found: list[str] = []
    kinds = schema.get("type")
    if kinds is not None and not _is_a(value, [kinds] if isinstance(kinds, str) else kinds):
        return [f"{value!r} is not {kinds}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{value!r} is too short")
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{value!r} is too long")
        if "pattern" in schema and re.search(_ecma(schema["pattern"]), value) is None:
            found.append(f"{value!r} does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", value):
            found.append(f"{value!r} is under {schema['minimum']}")
        if value > schema.get("maximum", value):
            found.append(f"{value!r} is over {schema['maximum']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{name} is missing")
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                found += [f"{name}: {p}" for p in _problems(value[name], prop, components)]
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += [f"[{index}]: {p}" for p in _problems(item, schema["items"], components)]
    if "anyOf" in schema and all(_problems(value, b, components) for b in schema["anyOf"]):
        found.append(f"{value!r} fits none of anyOf")
    if "oneOf" in schema:
        fits = [b for b in schema["oneOf"] if not _problems(value, b, components)]
        if len(fits) != 1:
            found.append(f"{value!r} fits {len(fits)} of oneOf")
    return found


def _ecma(pattern: str) -> str:
    """A JSON Schema (ECMA-262) pattern for ``re``: its final ``$`` ends the string only."""
    return re.sub(r"(?<!\\)\$$", r"\\Z", pattern)


def _is_a(value: Any, kinds: list[str]) -> bool:
    kind = JSON_TYPES[type(value)]
    return kind in kinds or (kind == "integer" and "number" in kinds)


# -- the topology -------------------------------------------------------------------


def _amqp_bindings(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        channel["bindings"]["amqp"]
        for channel in spec["channels"].values()
        if channel["bindings"]["amqp"]["exchange"]["name"]  # not the default exchange
    ]


def test_exchanges_are_the_topology_exchanges(spec: dict[str, Any]) -> None:
    documented = {
        b["exchange"]["name"]: (b["exchange"]["type"], b["exchange"]["durable"])
        for b in _amqp_bindings(spec)
    }
    expected = {e["name"]: (e["type"], e["durable"]) for e in definitions("warmer")["exchanges"]}
    assert documented == expected
    for binding in _amqp_bindings(spec):
        assert binding["exchange"]["autoDelete"] is False


def test_queues_are_the_topology_queues(spec: dict[str, Any]) -> None:
    queues = [b["x-queue"] for b in _amqp_bindings(spec) if "x-queue" in b]
    assert {q["name"]: q["arguments"] for q in queues} == {
        q["name"]: q["arguments"] for q in definitions("warmer")["queues"]
    }
    for queue in queues:
        assert (queue["durable"], queue["autoDelete"], queue["exclusive"]) == (True, False, False)


def test_bindings_are_the_topology_bindings(spec: dict[str, Any]) -> None:
    documented = {
        (b["exchange"]["name"], b["x-queue"]["name"], b["x-queue"]["bindingKey"])
        for b in _amqp_bindings(spec)
        if "x-queue" in b
    }
    expected = {
        (b["source"], b["destination"], b["routing_key"]) for b in definitions("warmer")["bindings"]
    }
    assert documented == expected


def test_channel_addresses_are_the_exchange_names(spec: dict[str, Any]) -> None:
    for name, channel in spec["channels"].items():
        exchange = channel["bindings"]["amqp"]["exchange"]["name"]
        assert channel["address"] == (exchange or None), name


def test_persistence_of_what_the_worker_sends(spec: dict[str, Any]) -> None:
    operations = spec["operations"]
    assert operations["sendWarmRequested"]["bindings"]["amqp"]["deliveryMode"] == 2
    assert operations["sendWarmRequested"]["bindings"]["amqp"]["mandatory"] is True
    assert operations["sendSurfaceChanged"]["bindings"]["amqp"]["deliveryMode"] == 1
    assert operations["sendSurfaceChanged"]["bindings"]["amqp"]["mandatory"] is False
    assert operations["sendDeadLetter"]["bindings"]["amqp"]["deliveryMode"] == 2
    messages = spec["components"]["messages"]
    persistent = {
        key: m["bindings"]["amqp"]["x-persistent"] for key, m in messages.items() if "bindings" in m
    }
    assert persistent == {
        "warmRequested": True,
        "surfaceChanged": False,
        "settingsReply": False,
        "stateReply": False,
        "errorReply": False,
        "deadLetter": True,
    }
