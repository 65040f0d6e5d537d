"""The wanted fields of each record in a `get_all_records` XML-RPC response, read as it streams.

`get_all_records` of thousands of VMs is tens of MB of XML: the XML-RPC unmarshaller would spend
seconds and as many MB building all ninety fields of every record. This reader finds each wanted
field with `bytes.find` (a `<member><name>F</name><value>` marker, at C speed), checks that no map
encloses it, and decodes only the wanted values. Pure: bytes in, plain values out.

xapi writes no whitespace between elements; the line breaks Python's XML-RPC writer puts after
tags are removed first.
"""
from html import unescape
import re
import xmlrpc.client
from xml.parsers.expat import ExpatError

import XenAPI

_VALUE_STRUCT = re.compile(rb"<name>Value</name><value><struct>")
_REF_NAME = b"name>OpaqueRef:"  # rarer than the member's opening tags: `find` skips faster
_MEMBER_OPEN = b"<member><"
_RECORD_OPEN = b"</name><value><struct>"
_STRUCT, _STRUCT_END = b"<struct>", b"</struct>"
_ARRAY_END = b"</array>"
_SPACED = re.compile(rb"<(?:methodResponse|params?)>\s")
_BETWEEN_TAGS = re.compile(rb"(<(?:/?(?:member|struct|array|data|params?|methodResponse)|/(?:name|value|param))>"
                           rb"|\?>)\s+")
_TYPED = re.compile(rb"<(string|boolean|int|i4|i8|double|dateTime\.iso8601)>([^<]*)</\1>|<string/>")
_MAP_ITEM = re.compile(rb"<member><name>([^<]*)</name>(?:<value>(?:<string>([^<]*)</string>|<string/>|([^<]*))</value>"
                       rb"|<value/>)")
_BARE_MAP_ITEM = re.compile(rb"<member><name>([^<&]*)</name><value>([^<&]*)</value>")  # xapi's, nothing escaped
_ARRAY_ITEM = re.compile(rb"<value>(?:<string>([^<]*)</string>|<string/>|([^<]*))</value>")
_NUMBERS = {b"int": int, b"i4": int, b"i8": int, b"double": float}


class ResponseError(ValueError):
    """A `get_all_records` response this reader does not understand."""


def _text(raw):
    text = raw.decode("utf-8")
    return unescape(text) if "&" in text else text


def _value(data, at):
    """(value, end) of the XML-RPC value whose content starts at `at`, just after `<value>`."""
    if data.startswith(b"<struct>", at):
        end = data.index(_STRUCT_END, at)
        items = _BARE_MAP_ITEM.findall(data, at, end)
        if len(items) == data.count(b"<member>", at, end):  # no member escaped, typed or empty
            return {name.decode("utf-8"): value.decode("utf-8") for name, value in items}, end + 9
        return {_text(name): _text(a or b) for name, a, b in _MAP_ITEM.findall(data, at, end)}, end + 9
    if data.startswith(b"<array>", at):
        end = data.index(_ARRAY_END, at)
        return [_text(a or b) for a, b in _ARRAY_ITEM.findall(data, at, end)], end + len(_ARRAY_END)
    if data.startswith(b"<", at) and not data.startswith(b"</value>", at):
        typed = _TYPED.match(data, at)
        if typed is None:
            raise ResponseError("unexpected value at byte {}: {!r}".format(at, data[at:at + 40]))
        kind, raw = typed.groups()
        if kind == b"boolean":
            return raw.strip() == b"1", typed.end()
        return (_NUMBERS[kind](raw) if kind in _NUMBERS else _text(raw or b"")), typed.end()
    end = data.index(b"</value>", at)
    return _text(data[at:end]), end


class _Reader(object):
    """Reads the wanted fields of records, searching them in the order the records hold them.

    A field is searched by its `<name>F</name>`: `bytes.find` skips ahead on it faster than on the
    whole `<member><name>F</name><value>`, and in XML-RPC a `<name>` only ever opens a member.
    """

    def __init__(self, fields):
        self.anchors = []
        for name in fields:
            anchor = "<name>{}</name><value".format(name).encode("ascii")
            self.anchors.append((name, anchor[:-6], len(anchor)))
        self.ordered = False

    def record(self, data, start, end):
        """{field: value} of the record whose members span data[start:end]."""
        if not self.ordered:
            self.anchors.sort(key=lambda item: _position(_member(data, item[1], start, data.find(item[1], start, end),
                                                                 end), end))
            self.ordered = True
        record = {}
        position = start  # a point between the record's own members, never inside a map
        find, rfind, index, startswith = data.find, data.rfind, data.index, data.startswith
        for name, anchor, width in self.anchors:
            found = find(anchor, position, end)
            if found == -1:
                if position == start:
                    continue
                found = _member(data, anchor, start, find(anchor, start, end), end)  # held in another order
                if found == -1:
                    continue
            else:
                opened = rfind(b"<struct>", position, found)
                if opened != -1 and find(b"</struct>", opened, found) == -1:  # inside a map: look further
                    found = _member(data, anchor, position, found, end)
                    if found == -1 and position != start:
                        found = _member(data, anchor, start, find(anchor, start, end), end)
                    if found == -1:
                        continue
            at = found + width + 1  # after "<value>"
            if data[at] != 60 and data[at - 1] == 62:  # a bare string, as xapi writes them
                position = index(b"</value>", at)
                text = data[at:position].decode("utf-8")
                record[name] = unescape(text) if "&" in text else text
            elif data[at - 1] != 62:  # "<value/>", an empty string
                record[name] = ""
                position = at + 1
            elif startswith(b"<boolean>", at) and startswith(b"</boolean>", at + 10):
                record[name] = data[at + 9] == 49  # "1"
                position = at + 20
            elif startswith(b"<struct></struct>", at):
                record[name] = {}
                position = at + 17
            elif startswith(b"<array><data></data></array>", at):
                record[name] = []
                position = at + 28
            else:
                record[name], position = _value(data, at)
        return record


def _position(found, end):
    return end if found == -1 else found


def _member(data, anchor, position, found, end):
    """The first `anchor` from `found` on that is outside any map opened after `position`, or -1.

    xapi's maps hold strings, never maps: a point is inside one when no `</struct>` follows the
    nearest `<struct>` before it.
    """
    while found != -1:
        opened = data.rfind(_STRUCT, position, found)
        if opened == -1 or data.find(_STRUCT_END, opened, found) != -1:
            return found
        found = data.find(anchor, found + 1, end)
    return -1


def _records(data, final):
    """(ref, members start, members end) of the records in `data`; the last one only when `final`.

    A record starts with a ref-named member whose value is a struct (maps keyed by refs hold strings).
    """
    starts = []
    find, startswith = data.find, data.startswith
    mark = find(_REF_NAME)
    while mark != -1:
        name_end = find(b"</name>", mark)
        if name_end == -1:
            break
        if startswith(_RECORD_OPEN, name_end) and mark >= 9 and startswith(_MEMBER_OPEN, mark - 9):
            starts.append((mark - 9, data[mark + 5:name_end], name_end + len(_RECORD_OPEN)))
        mark = find(_REF_NAME, name_end)
    ends = [mark for mark, _, _ in starts[1:]] + [len(data)]
    complete = len(starts) if final else len(starts) - 1
    return [(starts[index][1], starts[index][2], ends[index]) for index in range(complete)]


def _compact(chunks):
    """The chunks, without the whitespace Python's XML-RPC writer puts after tags (xapi puts none)."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 512:
            break
    if not _SPACED.search(head, 0, 512):
        yield head
        yield from chunks
        return
    pending = head
    for chunk in chunks:
        pending += chunk
        cut = pending.rfind(b"<")  # whitespace that ends this chunk may go on in the next one
        if cut <= 0:
            continue
        yield _BETWEEN_TAGS.sub(rb"\1", pending[:cut])
        pending = pending[cut:]
    yield _BETWEEN_TAGS.sub(rb"\1", pending)


def parse_records(chunks, fields):
    """(ref, {field: value}) of each record of a `get_all_records` response, with only `fields`.

    A record is read once the next one starts, so memory holds one chunk and one record; an
    xapi failure raises `XenAPI.Failure`, anything unreadable `ResponseError`.
    """
    reader = _Reader(fields)
    pending = b""
    started = False
    for chunk in _compact(chunks):
        pending += chunk
        if not started:
            value = _VALUE_STRUCT.search(pending)
            if value is None:
                continue
            pending, started = pending[value.end():], True
        records = _records(pending, final=False)
        yield from _read(reader, pending, records)
        if records:
            pending = pending[records[-1][2]:]
    if not started:
        _failure(pending)
    if not pending.rstrip().endswith(b"</methodResponse>"):
        raise ResponseError("the response was cut short after {} bytes of its last record".format(len(pending)))
    yield from _read(reader, pending, _records(pending, final=True))


def _read(reader, data, records):
    """(ref, {field: value}) of each of `records` in `data`."""
    ref = b""
    try:
        for ref, members, end in records:
            yield ref.decode("ascii"), reader.record(data, members, end)
    except ResponseError:
        raise
    except (ValueError, UnicodeDecodeError) as error:
        raise ResponseError("record {} cut short or garbled: {}".format(
            ref[:60].decode("ascii", "replace"), error)) from None


def _failure(body):
    try:
        (result,), _ = xmlrpc.client.loads(body.decode("utf-8"))
    except (ValueError, xmlrpc.client.ResponseError, ExpatError) as error:
        raise ResponseError("unreadable answer: {}".format(error)) from None
    raise XenAPI.Failure(result.get("ErrorDescription") or ["failure without a description"])
