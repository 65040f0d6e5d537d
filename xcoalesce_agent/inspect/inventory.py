"""This host's identity from `/etc/xensource-inventory` (`KEY='value'` lines, as xapi writes it)."""
import shlex

from ..errors import HostUnreachable


def read(path):
    """All keys of the inventory file as a dict of strings."""
    try:
        with open(path, encoding="utf-8") as stream:
            content = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise HostUnreachable("cannot read the host inventory {}: {}".format(
            path, getattr(error, "strerror", None) or error)) from None
    values = {}
    for line in content.splitlines():
        key, separator, value = line.partition("=")
        if not separator or not key.strip() or key.strip().startswith("#"):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value.strip()]
        values[key.strip()] = words[0] if words else ""
    return values


def host_uuid(path):
    """INSTALLATION_UUID: the UUID xapi knows this host by."""
    uuid = read(path).get("INSTALLATION_UUID")
    if not uuid:
        raise HostUnreachable("the host inventory {} has no INSTALLATION_UUID".format(path))
    return uuid
