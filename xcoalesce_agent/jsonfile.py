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


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(value, sort_keys=True))   # one shot: the C encoder, not json.dump's Python one
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
