"""docs/contract.md and docs/semantics.md say what the code does, and every link resolves.

The two pages are the spec users read (orchestrator and dashboard authors, operators), as
docs/asyncapi.yaml is for machines. Each name the code puts on the wire or reads from the
environment is looked up in them, both ways where the docs list a closed set: every error
code, status, message type and field, cost policy, "Not warming" reason and setting, with
the settings' defaults; the limits are the code's constants; the rounding and interval
examples of semantics.md are run through the worker's own functions; the panel's fields
come in the order `build_panel` builds them. A code, status or setting added to the code and
not to the docs fails here, and so does a link to a file or heading that is not there (the
spec once lived outside the repository, where a clone cannot follow it).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, get_args

import msgspec
import pytest
from msgspec import Struct

from warmer import contract
from warmer.batch import UNKNOWN_TYPES_REMEMBERED
from warmer.bus.topology import DELIVERY_LIMIT
from warmer.config import SETTINGS, Setting
from warmer.contract import MAX_BODY_BYTES, MAX_DEPTH, MAX_ERROR_CHARS, MAX_ID_BYTES, Status
from warmer.core import Conversation, GapModel, Hold, Policy
from warmer.core.economy import ADVICE_MIN_GAPS, Economy
from warmer.core.panel import DEFAULT_PANEL, SET_INTERVAL_ACTION, TOGGLE_ACTION, build_panel
from warmer.core.rules import (
    CLOCK_SKEW_MS,
    DEFAULT_INTERVAL_MS,
    GENERATING,
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    NO_CONSUMER,
    cache_pct,
    clamp_interval,
    expected_pct,
    interval_seconds,
    round_half_up,
    seconds_to_interval,
    timeout_error,
)
from warmer.worker import RETRY_FIRST_MS, RETRY_MAX_MS

ROOT: Final = Path(__file__).parents[2]
DOCS: Final = ROOT / "docs"
CONTRACT: Final = (DOCS / "contract.md").read_text(encoding="utf-8")
SEMANTICS: Final = (DOCS / "semantics.md").read_text(encoding="utf-8")

_CODE_SPAN: Final = re.compile(r"`([^`]+)`")
_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TABLE_KEY: Final = re.compile(r"^\s*\| `([^`]+)` \|(.*)$", re.MULTILINE)
_LINK: Final = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING: Final = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
_FENCE: Final = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


# --- reading the pages ---------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of ``text`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"no section '## {heading}'"
    return match.group(1)


def table_keys(text: str) -> list[str]:
    """The first cells of a table's rows, where they are one code span, in order."""
    return [key for key, _ in table_rows(text)]


def table_rows(text: str) -> list[tuple[str, list[str]]]:
    """Each row whose first cell is one code span: (that code, the other cells)."""
    rows = []
    for key, rest in _TABLE_KEY.findall(text):
        cells = [cell.strip() for cell in rest.strip().strip("|").split(" | ")]
        rows.append((key, cells))
    return rows


def code_words(text: str) -> set[str]:
    """Every identifier written inside a code span (`...`) of ``text``."""
    return {word for span in _CODE_SPAN.findall(text) for word in _WORD.findall(span)}


def missing(names: Iterable[str], documented: Iterable[str]) -> list[str]:
    """The names the docs do not have (sorted): what a test reports."""
    have = set(documented)
    return sorted(set(names) - have)


def unknown(documented: Iterable[str], names: Iterable[str]) -> list[str]:
    """What the docs list that the code does not have."""
    return missing(documented, names)


# --- what the code has ---------------------------------------------------------------


def _tags(union: Any) -> list[str]:
    return [member.__struct_config__.tag for member in get_args(union)]


EVENT_TYPES: Final = _tags(contract.LifecycleEvent)
COMMAND_TYPES: Final = _tags(contract.Command)
OUTBOUND_TYPES: Final = [contract.WarmRequested.__struct_config__.tag, "surface.changed"]
ERROR_CODES: Final = list(get_args(contract.ErrorCode))
POLICIES: Final = list(get_args(contract.CostPolicyName))
REASONS: Final = [hold.value for hold in Hold if hold is not Hold.NONE]


def _wire_structs() -> list[type[Struct]]:
    internal = {contract.Rejection, contract.UnknownType}
    return [
        obj
        for name, obj in vars(contract).items()
        if inspect.isclass(obj)
        and issubclass(obj, Struct)
        and obj.__module__ == contract.__name__
        and not name.startswith("_")
        and obj not in internal
    ]


def wire_field_names() -> set[str]:
    """Every field name a wire message has, as encoded, tag fields included."""
    names: set[str] = set()
    for struct in _wire_structs():
        names.update(field.encode_name for field in msgspec.structs.fields(struct))
        tag_field = struct.__struct_config__.tag_field
        if tag_field is not None:
            names.add(tag_field)
    return names


def _meta(annotated: Any) -> msgspec.Meta:
    (meta,) = [arg for arg in get_args(annotated) if isinstance(arg, msgspec.Meta)]
    return meta


# --- error codes, statuses, types, fields --------------------------------------------


def test_the_error_code_table_is_the_contract_codes() -> None:
    codes = table_keys(section(CONTRACT, "Encoding"))
    assert codes == ERROR_CODES, "the same codes, in the code's order"


def test_the_status_table_is_the_contract_statuses() -> None:
    statuses = table_keys(section(CONTRACT, "Outbound: surface updates"))
    assert missing([s.value for s in Status], statuses) == []
    assert unknown(statuses, [s.value for s in Status]) == []


def test_semantics_gives_every_status_its_rule() -> None:
    listed = re.findall(r"^- `(\w+)`:", section(SEMANTICS, "Status"), re.MULTILINE)
    assert sorted(listed) == sorted(s.value for s in Status)
    # The pending ones are the ones with a timer, as `Status.pending` says.
    for status in Status:
        assert status.pending == (status in {Status.ARMED, Status.WARMING, Status.RETRYING})


def test_the_event_table_is_the_lifecycle_events() -> None:
    assert table_keys(section(CONTRACT, "Inbound: lifecycle events")) == EVENT_TYPES


def test_the_command_table_is_the_commands() -> None:
    assert table_keys(section(CONTRACT, "Inbound: commands")) == COMMAND_TYPES


def test_every_event_field_is_in_its_row() -> None:
    rows = dict(table_rows(section(CONTRACT, "Inbound: lifecycle events")))
    for member in get_args(contract.LifecycleEvent):
        tag = member.__struct_config__.tag
        written = {w.rstrip("?") for w in code_words(rows[tag][0])}
        names = {f.encode_name for f in msgspec.structs.fields(member)}
        assert missing(names, written) == [], tag
        assert unknown(written, names) == [], tag


def test_every_command_field_is_in_its_row() -> None:
    rows = dict(table_rows(section(CONTRACT, "Inbound: commands")))
    for member in get_args(contract.Command):
        tag = member.__struct_config__.tag
        names = {f.encode_name for f in msgspec.structs.fields(member)}
        assert missing(names, code_words(rows[tag][0])) == [], tag


def test_the_outbound_types_are_named() -> None:
    words = code_words(CONTRACT)
    for tag in OUTBOUND_TYPES:
        assert f'"type": "{tag}"' in CONTRACT, tag
        assert tag in {span for span in _CODE_SPAN.findall(CONTRACT)} or tag in words


def test_every_wire_field_name_is_in_the_contract() -> None:
    assert missing(wire_field_names(), code_words(CONTRACT)) == []


def test_set_policy_names_every_cost_policy() -> None:
    (row,) = [cells for key, cells in table_rows(CONTRACT) if key == "set_policy"]
    assert missing([f'"{p}"' for p in POLICIES], re.findall(r'"\w+"', row[0])) == []
    policy = section(SEMANTICS, "Beyond a naive design: what the worker adds")
    assert missing(POLICIES, code_words(policy)) == []


# --- limits --------------------------------------------------------------------------


def _limit_phrases() -> list[tuple[str, str]]:
    """(page, phrase) pairs, each stating one limit with the code's value."""
    cwd = _meta(contract.Cwd).max_length
    model = _meta(contract.ModelName).max_length
    ttl = _meta(contract.CacheTtlS).le
    assert contract.MAX_SAFE_INTEGER == 2**53 - 1, "written as 2^53 - 1"
    shown = len(contract.UnknownType("x" * 1000).shown)
    return [
        ("contract", f"body at most {MAX_BODY_BYTES // 1024} KiB"),
        ("contract", f"a body over {MAX_BODY_BYTES // 1024} KiB"),
        ("contract", f"`conversationId` 1 to {MAX_ID_BYTES} bytes of UTF-8"),
        ("contract", f"`cwd` at most {cwd} characters"),
        ("contract", f"`modelName` at most {model} characters"),
        ("contract", "`seq` are integers from 0 to 2^53 - 1"),
        ("contract", "an integer from 1 to 2^53 - 1"),
        ("contract", f"at most {MAX_ERROR_CHARS} characters"),
        ("contract", f"Nesting deeper than {MAX_DEPTH} levels"),
        ("contract", f"`x-delivery-limit: {DELIVERY_LIMIT}`"),
        ("contract", f"up to {UNKNOWN_TYPES_REMEMBERED} unknown types"),
        ("contract", f"cut to {shown} characters"),
        ("contract", f"Up to {CLOCK_SKEW_MS // 1000} s in\n  the future counts as now"),
        ("contract", f"from 0 to {ttl} ((2^53 - 1) / 1000"),
        ("contract", f"backs off from {RETRY_FIRST_MS} ms, doubling to {RETRY_MAX_MS // 1000} s"),
        ("contract", f"once {ADVICE_MIN_GAPS} idle gaps were seen"),
        ("contract", f"0, -5, 500 -> {MIN_INTERVAL_MS};\n  above {MAX_INTERVAL_MS} (24 h)"),
        ("semantics", f"default **{DEFAULT_INTERVAL_MS}**"),
        ("semantics", f"minimum **{MIN_INTERVAL_MS}**"),
        ("semantics", f"maximum **{MAX_INTERVAL_MS}**"),
        ("semantics", f"min({MAX_INTERVAL_MS}, max({MIN_INTERVAL_MS}, round(x)))"),
        ("semantics", f"anything else\n  reads as {DEFAULT_INTERVAL_MS}"),
        ("semantics", f"up to {CLOCK_SKEW_MS // 1000} s in the future"),
        ("semantics", f"spread over at most {Policy().recovery_spread_ms // 1000} s"),
        ("semantics", f"cut to {MAX_ERROR_CHARS} characters"),
    ]


@pytest.mark.parametrize(("page", "phrase"), _limit_phrases())
def test_every_limit_is_the_code_constant(page: str, phrase: str) -> None:
    text = CONTRACT if page == "contract" else SEMANTICS
    assert phrase in text


def test_the_cache_ttl_bound_keeps_milliseconds_safe() -> None:
    ttl = _meta(contract.CacheTtlS).le
    assert ttl == contract.MAX_SAFE_INTEGER // 1000


def test_the_last_error_texts_are_the_code_texts() -> None:
    rules = section(SEMANTICS, "Rules")
    assert f"`{NO_CONSUMER}`" in rules
    template = "`no completion within N s`"
    assert template in rules
    assert timeout_error(60_000) == template.strip("`").replace("N", "60")
    assert timeout_error(1_500) == template.strip("`").replace("N", "2"), "rounded half up"
    assert f'"{GENERATING}"' in rules and f'"{GENERATING}"' in CONTRACT


# --- examples run through the code ---------------------------------------------------


def _examples_sentence() -> str:
    rules = section(SEMANTICS, "Rules")
    start = rules.index("Examples: (")
    return " ".join(rules[start : rules.index("\n- ", start)].split())


def test_the_percentage_examples_are_what_the_code_computes() -> None:
    sentence = _examples_sentence()
    pct_part, _, expected_part = sentence.partition("read/write")
    pairs = re.findall(r"\((-?\d+), (-?\d+)\) -> (\d+)", pct_part)
    assert len(pairs) == 7
    for input_tokens, read, pct in pairs:
        assert cache_pct(int(input_tokens), int(read)) == int(pct), (input_tokens, read)
    ((read, write, pct),) = re.findall(r"\((\d+), (\d+)\) -> (\d+)", expected_part)
    assert expected_pct(int(read), int(write)) == int(pct)
    # The parenthesis in the examples: the double the rule rounds.
    assert 29 / 200 * 100 == 14.499999999999998
    assert "(29 / 200 * 100 is 14.499999999999998)" in sentence


def test_the_half_up_examples_are_what_the_code_rounds() -> None:
    rules = section(SEMANTICS, "Rules")
    half_up = re.search(r"Math\.round \(([^)]*)\)", rules)
    assert half_up is not None
    examples = re.findall(r"(-?\d+(?:\.\d+)?) -> (-?\d+)", half_up.group(1))
    assert examples == [("0.5", "1"), ("2.5", "3")]
    for x, rounded in examples:
        assert round_half_up(float(x)) == int(rounded)
        assert round(float(x)) != int(rounded), "the example shows where Python differs"


def _interval_examples() -> dict[str, list[tuple[str, str]]]:
    rules = section(SEMANTICS, "Rules")
    start = rules.index("intervalMs 0 ->")
    text = " ".join(rules[start : rules.index("\n- ", start)].split())
    groups: dict[str, list[tuple[str, str]]] = {}
    for part in text.split(";"):
        words = part.split()
        if words[0] in {"intervalMs", "seconds", "shown"}:
            key = words.pop(0)
        groups.setdefault(key, []).append((words[0], " ".join(words[2:]).rstrip(".")))
    return groups


def test_the_interval_examples_are_what_the_code_computes() -> None:
    groups = _interval_examples()
    assert set(groups) == {"intervalMs", "seconds", "shown"}
    for given, clamped in groups["intervalMs"]:
        assert clamp_interval(float(given)) == int(clamped), given
    for seconds, ms in groups["seconds"]:
        assert seconds_to_interval(float(seconds)) == int(ms), seconds
    for ms, shown in groups["shown"]:
        assert f"{interval_seconds(int(ms))} s" == shown, ms


def test_the_contract_clamp_examples_are_what_the_code_clamps() -> None:
    for given in (0, -5, 500):
        assert clamp_interval(given) == MIN_INTERVAL_MS
    assert clamp_interval(MAX_INTERVAL_MS + 1) == MAX_INTERVAL_MS
    assert clamp_interval(float("inf")) == MAX_INTERVAL_MS, "beyond a double's range"


# --- the panel -----------------------------------------------------------------------


def _full_panel() -> list[dict[str, Any]]:
    """The panel with every field the core can add: a conversation that has it all."""
    model = GapModel()
    for _ in range(ADVICE_MIN_GAPS):
        model.observe(30 * 60_000)  # half-hour gaps: a 1-hour cache would cost less
    economy = Economy(Policy(), model)
    conversation = Conversation(
        enabled=True,
        interval_ms=120_000,
        idle_since=0,
        policy="budget",
        cache_ttl_ms=300_000,
        prefix_tokens=5_000,
        hold=Hold.MISSES,
        misses=2,
        spent=10_000,
        avoided=115_000,
        last_error="provider overloaded",
    )
    panel = build_panel(conversation.view(), economy.fields(conversation))
    return msgspec.to_builtins(panel)["fields"]  # type: ignore[no-any-return]


def _documented_fields() -> list[str]:
    """The numbered fields of the panel section, each item's text on one line."""
    text = section(CONTRACT, "The panel (`spec`)")
    items = re.split(r"^\d+\. ", text, flags=re.MULTILINE)[1:]
    return [" ".join(item.split("\n\n")[0].split()) for item in items]


def _name(field: dict[str, Any]) -> str:
    return str(field.get("label") or field.get("rendererId"))


def test_the_panel_fields_come_in_the_documented_order() -> None:
    built = _full_panel()
    documented = _documented_fields()
    names = [re.search(r'"(?:label|rendererId)": "([^"]+)"', f) for f in documented]
    assert [m.group(1) if m else None for m in names] == [_name(f) for f in built]


def test_each_documented_field_states_its_constant_parts() -> None:
    for field, text in zip(_full_panel(), _documented_fields(), strict=True):
        for key, value in field.items():
            if key in {"kind", "label", "rendererId", "min", "step", "unit"}:
                assert f'"{key}": {json.dumps(value, ensure_ascii=False)}' in text, (key, text)
            if key == "action":
                assert f'"actionId": "{value["actionId"]}"' in text
    assert {TOGGLE_ACTION, SET_INTERVAL_ACTION} <= code_words(CONTRACT) | {
        span for span in _CODE_SPAN.findall(CONTRACT)
    }


def test_the_cost_field_examples_are_what_the_core_writes() -> None:
    built = {_name(f): f.get("value") for f in _full_panel()}
    documented = {}
    for text in _documented_fields():
        found = re.search(r'"label": "([^"]+)", "value": "([^"]+)"', text)
        if found:
            documented[found.group(1)] = found.group(2)
    for label in ("Cache lifetime", "Effective interval", "Savings"):
        assert documented[label] == built[label], label
    advice = documented["Advice"]
    assert re.fullmatch(advice.replace("N", r"\d+"), str(built["Advice"])), built["Advice"]


def test_the_default_panel_is_the_documented_one() -> None:
    (field,) = msgspec.to_builtins(DEFAULT_PANEL)["fields"]
    assert f'"label": "Status", "value": "{field["value"]}"' in section(
        CONTRACT, "The panel (`spec`)"
    )
    assert f'"id": "{DEFAULT_PANEL.id}", "region": "{DEFAULT_PANEL.region}"' in CONTRACT
    assert f'"title": "{DEFAULT_PANEL.title}"' in CONTRACT


# --- 'Not warming' -------------------------------------------------------------------

_HOLD_STATUS: Final = {
    Hold.EXPIRED: Status.EXPIRED,
    Hold.SMALL_PREFIX: Status.IDLE,
    Hold.MISSES: Status.PAUSED,
    Hold.SPEND_CAP: Status.BUDGET_EXHAUSTED,
    Hold.RETURN_UNLIKELY: Status.IDLE,
}


def _why(hold: Hold, policy: Policy) -> str:
    """The "Not warming" text the core writes for ``hold``."""
    conversation = Conversation(
        enabled=True, interval_ms=240_000, idle_since=0, prefix_tokens=517, misses=3, hold=hold
    )
    fields = Economy(policy).fields(conversation)
    (text,) = [f.value for f in fields if f.label == "Not warming"]
    return text


def test_every_not_warming_reason_is_documented_with_the_core_text() -> None:
    rows = dict(table_rows(section(SEMANTICS, "Not warming")))
    assert list(rows) == REASONS
    policy = Policy(min_prefix_tokens=1031, spend_cap_tokens=70_001)
    values = {"prefix": 517, "min": 1031, "misses": 3, "cap": 70_001}
    for hold in Hold:
        if hold is Hold.NONE:
            continue
        status, text = rows[hold.value]
        assert text.format(**values) == _why(hold, policy), hold
        assert status == f"`{_HOLD_STATUS[hold].value}`", hold


def test_every_reason_is_a_hold() -> None:
    assert set(_HOLD_STATUS) == {hold for hold in Hold if hold is not Hold.NONE}


# --- settings ------------------------------------------------------------------------


def test_the_settings_table_is_every_setting_with_its_default() -> None:
    rows = table_rows(section(SEMANTICS, "Settings"))
    assert [name for name, _ in rows] == [s.name for s in SETTINGS]
    for (name, cells), setting in zip(rows, SETTINGS, strict=True):
        assert cells[0] == f"`{setting.default}`", name


def test_every_setting_the_pages_name_is_one() -> None:
    known = {s.name for s in SETTINGS}
    named = set(re.findall(r"\bWARMER_[A-Z0-9_]+\b", CONTRACT + SEMANTICS))
    assert unknown(named, known) == []


# --- links ---------------------------------------------------------------------------


def _markdown_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules"}
    return sorted(
        p
        for p in ROOT.rglob("*.md")
        if not skip & set(p.relative_to(ROOT).parts) and not p.name.startswith(".")
    )


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(heading) for heading in _HEADING.findall(text)}


def broken_links(path: Path) -> list[str]:
    """Relative links of ``path`` that lead nowhere: no such file, or no such heading."""
    broken = []
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        inside = linked == ROOT or ROOT in linked.parents
        found = inside and linked.exists()
        if not found or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    assert broken_links(path) == []


def test_nothing_points_outside_the_repository_for_the_spec() -> None:
    # CHANGELOG.md is history: it says where the spec was.
    places = [ROOT / "README.md", *DOCS.glob("*"), *(ROOT / "warmer").rglob("*.py")]
    places += [*(ROOT / "deploy").rglob("*.md"), *(ROOT / "tests").rglob("*.py")]
    named = re.compile(r"\.\./shared|\b(CONTRACT|SEMANTICS)\.md")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in places
        if path.is_file() and path != Path(__file__)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if named.search(line)
    ]
    assert found == []


def test_the_readme_links_both_pages() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/contract.md)" in readme
    assert "](docs/semantics.md)" in readme


# --- the checks bite -----------------------------------------------------------------


def test_a_code_status_or_setting_the_docs_lack_is_reported() -> None:
    assert missing([*ERROR_CODES, "disk_full"], table_keys(section(CONTRACT, "Encoding"))) == [
        "disk_full"
    ]
    statuses = table_keys(section(CONTRACT, "Outbound: surface updates"))
    assert missing([*(s.value for s in Status), "sleeping"], statuses) == ["sleeping"]
    extra = Setting("WARMER_NEW", "namespace", "new", "anything")
    names = [name for name, _ in table_rows(section(SEMANTICS, "Settings"))]
    assert missing([s.name for s in (*SETTINGS, extra)], names) == ["WARMER_NEW"]
    assert missing(["cacheTtlS", "newField"], code_words(CONTRACT)) == ["newField"]


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    page = DOCS / "contract.md"
    assert broken_links(page) == []
    assert "the-panel-spec" in _anchors(page)
    assert slug("Outbound: warm requests") == "outbound-warm-requests"
    fake = tmp_path / "x.md"
    fake.write_text("[spec](../shared/CONTRACT.md) [a](#nowhere)\n", encoding="utf-8")
    assert broken_links(fake) == ["../shared/CONTRACT.md", "#nowhere"]
