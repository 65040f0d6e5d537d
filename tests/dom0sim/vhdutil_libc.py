"""The C library behaviour `vhd-util` relies on: basename(3), strtoul(3), printf's %#x and glibc's
getopt(3) with argument permutation."""
import re


def c_basename(path):
    """POSIX basename(3) from libgen.h: "" gives ".", trailing slashes are ignored."""
    if not path:
        return "."
    stripped = path.rstrip("/")
    if not stripped:
        return "/"
    return stripped.rsplit("/", 1)[-1]


def c_strtoul(text):
    """strtoul/strtoull(text, NULL, 10): leading digits, 0 when there are none."""
    match = re.match(r"\s*([+-]?)(\d+)", text)
    if not match:
        return 0
    value = int(match.group(2))
    return (-value) & 0xFFFFFFFFFFFFFFFF if match.group(1) == "-" else value


def c_strtol(text):
    """strtol(text, NULL, 10): leading digits, 0 when there are none."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def c_hex(value):
    """printf("%#" PRIx64): 0 is "0", everything else 0x..."""
    return "0" if value == 0 else "0x{:x}".format(value)


def conv(hex_mode, value):
    """A number as `read -x` shows it (hex) or in decimal."""
    return c_hex(value) if hex_mode else str(value)


def getopt(args, optstring, prog, output):
    """glibc getopt() with argument permutation. Returns (options, operands); '?' marks an error."""
    takes_arg = {}
    for index, char in enumerate(optstring):
        if char != ":":
            takes_arg[char] = optstring[index + 1:index + 2] == ":"
    options, operands = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            operands.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        position = 1
        while position < len(arg):
            char = arg[position]
            position += 1
            if char not in takes_arg or char == "-":
                output.error("{}: invalid option -- '{}'\n".format(prog, char))
                options.append(("?", None))
                continue
            if not takes_arg[char]:
                options.append((char, None))
                continue
            if position < len(arg):
                options.append((char, arg[position:]))
            elif index < len(args):
                options.append((char, args[index]))
                index += 1
            else:
                output.error("{}: option requires an argument -- '{}'\n".format(prog, char))
                options.append(("?", None))
            break
    return options, operands
