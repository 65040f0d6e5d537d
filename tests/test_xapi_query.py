"""The simulated xapi's filter expressions (get_all_records_where): the parser and evaluator on stored
records, then the call itself through the real XenAPI client."""
import datetime

import pytest
import XenAPI

from tests.dom0sim.xapi import Database, query
from tests.dom0sim.xapi.query import QueryError

SR_REF = "OpaqueRef:5a1c9ab0-0000-4000-8000-000000000001"


def holds(text, fields=None):
    """Whether the expression accepts a row whose columns are `fields`."""
    return query.parse(text)(lambda column: (fields or {})[column])


def parse_error(text):
    with pytest.raises(QueryError) as caught:
        query.parse(text)
    return str(caught.value)


@pytest.fixture
def vdis():
    """Stored VDI records: two on one SR, one elsewhere."""
    db = Database()
    sr = db.create("SR", ref=SR_REF, name_label="Local storage")
    other = db.create("SR", name_label="NFS")
    db.create("VDI", name_label="root", SR=sr, virtual_size=8 * 2 ** 20, sm_config={"vdi_type": "vhd"})
    db.create("VDI", name_label="data", SR=sr, read_only=True, tags=["it's", "b"])
    db.create("VDI", name_label="iso", SR=other)
    return db.records("VDI")


def labels(records):
    return [record["name_label"] for record in records.values()]


# ---- the language ------------------------------------------------------------------------------

def test_constants_and_literal_comparisons():
    assert holds("true") and not holds("false")
    assert holds('"a" = "a"') and not holds('"a" = "b"')
    assert holds('"" = ""')
    assert holds('"x y" = "x y"') and not holds('"x" = "x "')


def test_field_values():
    assert holds('field "SR" = "r1"', {"SR": "r1"})
    assert holds('"r1" = field "SR"', {"SR": "r1"})
    assert not holds('field "SR" = "r2"', {"SR": "r1"})
    assert holds('field "a" = field "b"', {"a": "x", "b": "x"})


def test_and_or_have_equal_precedence_and_group_left():
    assert not holds("true or true and false")          # (true or true) and false
    assert holds("false and false or true")             # (false and false) or true
    assert holds("true or (true and false)")
    assert not holds("false and (false or true)")


def test_not_reaches_to_the_right_end():
    assert holds("not true and false")                  # not (true and false)
    assert holds("(not true) or true")
    assert not holds("not false or true")               # not (false or true)
    assert holds("true and not false and false")        # true and not (false and false)
    assert holds("not not true")
    assert not holds('not "a" = "a"')


def test_parentheses():
    assert holds("(true)")
    assert holds("((false or true)) and (true)")
    assert not holds("(not true) and false")


def test_whitespace_and_newlines_and_no_whitespace():
    assert holds('\tfield "SR"\n=\n   "r1"  \n', {"SR": "r1"})
    assert holds('field"SR"="r1"and(true)or"a"="b"', {"SR": "r1"})
    assert holds('field "SR" = "OpaqueRef:x and y"', {"SR": "OpaqueRef:x and y"})


def test_unterminated_string():
    message = parse_error('field "SR" = "OpaqueRef:abc')
    assert "unterminated string at offset 13" in message
    assert repr('field "SR" = "OpaqueRef:abc') in message


@pytest.mark.parametrize("text, expected", [
    ("true false", "expected the end but found 'false' at offset 5"),
    ("true )", "expected the end but found ')' at offset 5"),
    ('"a" = "b" = "c"', "expected the end but found '=' at offset 10"),
    ("", "expected a string or 'field' but found the end at offset 0"),
    ('"a"', "expected '=' but found the end at offset 3"),
    ('field SR = "x"', "unexpected 'S' at offset 6"),
    ('field "SR" == "x"', "expected a string or 'field' but found '=' at offset 12"),
    ("(true", "expected ')' but found the end at offset 5"),
    ("true and", "expected a string or 'field' but found the end at offset 8"),
    ("field = \"x\"", "expected a string but found '=' at offset 6"),
    ("True", "unexpected 'T' at offset 0"),
    ("true\r\n", "unexpected '\\r' at offset 4"),
    ("'a' = 'a'", "unexpected \"'\" at offset 0"),
])
def test_syntax_errors_say_where(text, expected):
    message = parse_error(text)
    assert expected in message
    assert "\n" not in message
    assert repr(text) in message


def test_only_strings_are_expressions():
    assert "must be a string, not int" in parse_error(42)


# ---- records -----------------------------------------------------------------------------------

def test_select_by_reference(vdis):
    assert labels(query.select("VDI", vdis, 'field "SR" = "{}"'.format(SR_REF))) == ["root", "data"]
    assert query.select("VDI", vdis, 'field "SR" = "OpaqueRef:NULL"') == {}
    assert labels(query.select("VDI", vdis, 'not field "SR" = "{}"'.format(SR_REF))) == ["iso"]


def test_select_keeps_the_stored_records(vdis):
    selected = query.select("VDI", vdis, "true")
    assert list(selected) == list(vdis) and all(selected[ref] is vdis[ref] for ref in vdis)


def test_columns_are_named_as_in_the_database(vdis):
    assert labels(query.select("VDI", vdis, 'field "name__label" = "data"')) == ["data"]
    ref = next(iter(vdis))
    assert list(query.select("VDI", vdis, 'field "_ref" = "{}"'.format(ref))) == [ref]
    assert query.column_name("VM", "memory_static_max") == "memory__static_max"
    assert query.column_name("VM", "HVM_shadow_multiplier") == "HVM__shadow_multiplier"
    assert query.column_name("VM", "PCI_bus") == "PCI_bus"
    assert query.column_name("host", "API_version_major") == "API_version__major"
    assert query.column_name("VBD", "qos_algorithm_type") == "qos__algorithm_type"
    assert query.column_name("pool", "name_label") == "name_label"
    assert query.column_name("VDI", "SR") == "SR"


def test_values_compare_as_database_strings(vdis):
    def matching(text):
        return labels(query.select("VDI", vdis, text))
    assert matching('field "read_only" = "true"') == ["data"]
    assert matching('field "virtual_size" = "8388608"') == ["root"]
    assert matching('field "sm_config" = "((\'vdi_type\' \'vhd\'))"') == ["root"]
    assert matching('field "tags" = "(\'it\\\'s\' \'b\')"') == ["data"]
    assert matching('field "tags" = "()" and field "VBDs" = "()"') == ["root", "iso"]
    assert matching('field "snapshot_time" = "19700101T00:00:00Z"') == ["root", "data", "iso"]


def test_database_strings_of_each_kind():
    assert query.database_string("str", "Local storage") == "Local storage"
    assert query.database_string("bool", False) == "false"
    assert query.database_string("int", -1) == "-1"
    assert query.database_string("float", 1.0) == "1"
    assert query.database_string("float", 0.5) == "0.5"
    assert query.database_string("date", datetime.datetime(2024, 2, 29, 13, 5, 9)) == "20240229T13:05:09Z"
    assert query.database_string("ints", [0, 1]) == "('0' '1')"
    assert query.database_string("map", {"k": 'say "hi"', "b\\": "v"}) == "(('k' 'say \\\"hi\\\"') ('b\\\\' 'v'))"
    assert query.database_string("map", {}) == "()"


def test_unknown_field_fails_when_a_record_is_tested(vdis):
    with pytest.raises(QueryError) as caught:
        query.select("VDI", vdis, 'field "name_label" = "data"')
    assert str(caught.value) == "VDI has no field 'name_label' (filter expression 'field \"name_label\" = \"data\"')"
    assert query.select("VDI", {}, 'field "bogus" = "x"') == {}
    assert query.select("VDI", vdis, 'false and field "bogus" = "x"') == {}


# ---- through the real client -------------------------------------------------------------------

def test_get_all_records_where_over_the_socket(sim_host, xapi_session):
    host = sim_host("demo")
    api = xapi_session(host).xenapi
    everything = api.VDI.get_all_records()
    srs = api.SR.get_all()
    assert len(srs) == 2
    seen = {}
    for sr in srs:
        where = api.VDI.get_all_records_where('field "SR" = "{}"'.format(sr))
        assert where == {ref: record for ref, record in everything.items() if record["SR"] == sr}
        assert where and all(isinstance(record["virtual_size"], str) for record in where.values())
        seen.update(where)
    assert seen == everything
    label = next(iter(everything.values()))["name_label"]
    named = api.VDI.get_all_records_where('field "name__label" = "{}"'.format(label))
    assert named and all(record["name_label"] == label for record in named.values())
    assert api.VM.get_all_records_where('field "is_control_domain" = "true"') == {
        ref: record for ref, record in api.VM.get_all_records().items() if record["is_control_domain"]}
    assert api.SR.get_all_records_where("false") == {}


def test_bad_expressions_over_the_socket(sim_host, xapi_session):
    host = sim_host("demo")
    api = xapi_session(host).xenapi
    with pytest.raises(XenAPI.Failure) as caught:
        api.VDI.get_all_records_where('field "SR" = "OpaqueRef:')
    code, message = caught.value.details
    assert code == "INTERNAL_ERROR"
    assert "unterminated string" in message and 'field "SR" = "OpaqueRef:' in message
    with pytest.raises(XenAPI.Failure) as caught:
        api.VDI.get_all_records_where('field "name_label" = "x"')
    assert caught.value.details[0] == "INTERNAL_ERROR" and "no field 'name_label'" in caught.value.details[1]
    with pytest.raises(XenAPI.Failure) as caught:
        api.VDI.get_all_records_where()
    assert caught.value.details[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
