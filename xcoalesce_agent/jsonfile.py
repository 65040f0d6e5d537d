"""Small JSON state files in the agent's state directory (merge speeds, window usage, pending SRs):
a missing or unreadable file reads as its default, a write replaces the file whole."""
import json
import os


def read_json(path, default):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return default


# Compact and in the dicts' own order: for large state, where sorting and spaces cost time and memory.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def write_json(path, value, large_levels=0):
    """Replace the file with `value`; dicts in the top `large_levels` levels are written item by item
    (compact, unsorted) so that a large value's text is never whole in memory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        if large_levels:
            _write_items(stream, value, large_levels)
        else:
            stream.write(json.dumps(value, sort_keys=True))   # one shot: the C encoder, not json.dump's Python one
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def fsync_dir(path):
    """Make a file's creation, rename or removal in directory `path` durable, not only its bytes."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_items(stream, value, levels):
    if levels == 0 or not isinstance(value, dict):
        stream.write(_COMPACT.encode(value))
        return
    separator = "{"
    for key, item in value.items():
        stream.write(separator + _COMPACT.encode(key) + ":")
        _write_items(stream, item, levels - 1)
        separator = ","
    stream.write("}" if separator == "," else "{}")
