"""The streamed record reader against both XML-RPC styles: xapi's (the simulated xapi's writer) and Python's."""
import xmlrpc.client

import pytest
import XenAPI

from tests.dom0sim.xapi import wire
from xcoalesce_agent.inspect import xmlrecords

FIELDS = ("uuid", "name_label", "tags", "other_config", "is_a_snapshot", "virtual_size", "sm_config")
RECORDS = {
    "OpaqueRef:1": {"uuid": "u1", "current_operations": {"OpaqueRef:task": "attach"}, "name_label": "a&b <x>",
                    "tags": ["t1", ""], "virtual_size": "123", "is_a_snapshot": True, "sm_config": {},
                    "other_config": {"leaf-coalesce": "false", "uuid": "not this one", "name_label": "nor this"},
                    "ignored": "x", "xenstore_data": {"tags": "neither", "is_a_snapshot": "1"}},
    # fields in another order, a map before them holding keys named like them
    "OpaqueRef:2": {"platform": {"uuid": "no", "virtual_size": "9"}, "sm_config": {"vdi_type": "aio"},
                    "is_a_snapshot": False, "name_label": "  spaced  ", "tags": [], "uuid": "u2",
                    "virtual_size": "5", "other_config": {}},
    "OpaqueRef:3": {"uuid": "u3", "name_label": ""},
}
EXPECTED = {ref: {key: value for key, value in record.items() if key in FIELDS} for ref, record in RECORDS.items()}


def xapi_style(outcome):
    return wire.response_xml(outcome).encode("utf-8")


def python_style(outcome):
    return xmlrpc.client.dumps((outcome,), methodresponse=True).encode("utf-8")


def chunked(body, size):
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("style", [xapi_style, python_style])
@pytest.mark.parametrize("size", [1, 7, 100, 1 << 20])
def test_only_the_wanted_fields_of_each_record_whatever_the_chunks(style, size):
    body = style({"Status": "Success", "Value": RECORDS})
    assert list(xmlrecords.parse_records(chunked(body, size), FIELDS)) == list(EXPECTED.items())


def test_xapi_style_has_no_whitespace_and_bare_strings():
    body = xapi_style({"Status": "Success", "Value": RECORDS})
    assert b"\n" not in body and b"<value>u1</value>" in body and b"<string>" not in body


def test_values_of_every_kind():
    body = python_style({"Status": "Success", "Value": {"OpaqueRef:7": {
        "i": 42, "d": 1.5, "b": True, "s": "", "when": xmlrpc.client.DateTime("20261124T20:00:00Z")}}})
    assert dict(xmlrecords.parse_records([body], ("i", "d", "b", "s", "when"))) == {
        "OpaqueRef:7": {"i": 42, "d": 1.5, "b": True, "s": "", "when": "20261124T20:00:00Z"}}


def test_no_records():
    body = xapi_style({"Status": "Success", "Value": {}})
    assert list(xmlrecords.parse_records(chunked(body, 5), FIELDS)) == []


@pytest.mark.parametrize("style", [xapi_style, python_style])
def test_an_xapi_failure_is_raised_as_xenapi_failure(style):
    body = style({"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "x"]})
    with pytest.raises(XenAPI.Failure) as caught:
        list(xmlrecords.parse_records(chunked(body, 9), FIELDS))
    assert caught.value.details == ["SESSION_INVALID", "x"]


def test_a_response_cut_short_is_a_response_error():
    body = xapi_style({"Status": "Success", "Value": RECORDS})
    cut = body[:body.index(b"<member><name>OpaqueRef:3") - 30]
    with pytest.raises(xmlrecords.ResponseError) as caught:
        list(xmlrecords.parse_records([cut], FIELDS))
    assert "cut short" in str(caught.value)


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"garbage <", b"", b"\xff\xfe"])
def test_garbage_is_a_response_error(body):
    with pytest.raises(xmlrecords.ResponseError):
        list(xmlrecords.parse_records([body], FIELDS))


def test_a_garbled_record_names_itself():
    body = xapi_style({"Status": "Success", "Value": RECORDS}).replace(b"<value>u3</value>", b"<value>u3\xff</value>")
    with pytest.raises(xmlrecords.ResponseError) as caught:
        list(xmlrecords.parse_records([body], FIELDS))
    assert "OpaqueRef:3" in str(caught.value) and "b'" not in str(caught.value)


@pytest.mark.parametrize("size", [1, 13, 1 << 20])
def test_text_that_looks_like_markup_and_map_keys_named_like_fields(size):
    records = {
        "OpaqueRef:a": {"name_label": "<name>uuid</name><value>x</value> OpaqueRef:b </struct>", "uuid": "ua",
                        "other_config": {"uuid": "no", "<name>uuid</name>": "<struct>", "name>tags": "</name>"},
                        "tags": ["</value>", "&amp;"], "sm_config": {"a&b": "<c>", "OpaqueRef:x": "y"}},
        "OpaqueRef:b": {"xenstore_data": {"uuid": "no", "tags": "no", "sm_config": "no"}, "uuid": "ub",
                        "sm_config": {"uuid": "u", "vdi_type": "vhd"}, "name_label": "OpaqueRef:c"},
    }
    expected = [(ref, {key: value for key, value in record.items() if key in FIELDS})
                for ref, record in records.items()]
    for style in (xapi_style, python_style):
        body = style({"Status": "Success", "Value": records})
        assert list(xmlrecords.parse_records(chunked(body, size), FIELDS)) == expected


def test_an_empty_value_element_is_an_empty_string():
    body = xapi_style({"Status": "Success", "Value": {"OpaqueRef:e": {"uuid": "ue", "name_label": "x",
                                                                      "other_config": {"k": "v", "l": "w"}}}})
    body = body.replace(b"<value>x</value>", b"<value/>").replace(b"<value>v</value>", b"<value/>")
    assert list(xmlrecords.parse_records([body], FIELDS)) == [
        ("OpaqueRef:e", {"uuid": "ue", "name_label": "", "other_config": {"k": "", "l": "w"}})]
