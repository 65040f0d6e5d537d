"""glibc's fnmatch(3) and glob(3) as `vhd-util scan` calls them: LV name filters and file patterns."""
import errno
import os
import re


def _closing(text, open_index, end, brackets):
    """Index of the bracket that closes the one at open_index (nested pairs counted), or None."""
    opening, closing = brackets
    depth = 0
    for index in range(open_index, end):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
            if depth == 0:
                return index
    return None


def _top_level_parts(text, start, end, separator, brackets):
    """(begin, end) of each part of text[start:end] between separators outside nested brackets."""
    opening, closing = brackets
    depth, begin = 0, start
    for index in range(start, end):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
        elif text[index] == separator and depth == 0:
            yield begin, index
            begin = index + 1
    yield begin, end


def _set_char(char):
    """One character taken literally inside a regex set (where `[`, `-`, `&&` and the like are special)."""
    return "\\" + char if char in "\\]^-[&~|" else char


def _set_body(members):
    """The inside of a regex set for a bracket expression's members: single characters and `a-z`
    ranges; a range that runs backwards matches nothing, as in glibc."""
    out, index = [], 0
    while index < len(members):
        if members[index + 1:index + 2] == "-" and index + 2 < len(members):
            low, high = members[index], members[index + 2]
            if low <= high:
                out.append(_set_char(low) + "-" + _set_char(high))
            index += 3
        else:
            out.append(_set_char(members[index]))
            index += 1
    return "".join(out)


def has_magic(text):
    """True when `text` holds a wildcard, so glob must read a directory."""
    return re.search(r"[*?\[]", text) is not None


class Pattern(object):
    """fnmatch(3) with FNM_PATHNAME (wildcards never match '/'), FNM_EXTMATCH and FNM_PERIOD."""

    def __init__(self, pattern, period=False):
        self.regex = re.compile(self._parts(pattern, 0, len(pattern)) + r"\Z", re.DOTALL)
        self.hides_dot_files = period and not pattern.startswith(".")

    def match(self, name):
        if self.hides_dot_files and name.startswith("."):
            return False
        return self.regex.match(name) is not None

    def _parts(self, pattern, start, end):
        out = []
        index = start
        while index < end:
            char = pattern[index]
            if char in "?*+@!" and index + 1 < end and pattern[index + 1] == "(":
                close = _closing(pattern, index + 1, end, "()")
                if close is not None:
                    alternatives = "|".join(self._parts(pattern, a, b)
                                            for a, b in _top_level_parts(pattern, index + 2, close, "|", "()"))
                    rest = self._parts(pattern, close + 1, end)
                    group = "(?:" + alternatives + ")"
                    if char == "!":
                        out.append("(?:(?!" + group + rest + r"\Z)[^/]*)")
                    else:
                        out.append(group + {"?": "?", "*": "*", "+": "+", "@": ""}[char])
                    out.append(rest)
                    return "".join(out)
            if char == "*":
                out.append("[^/]*")
            elif char == "?":
                out.append("[^/]")
            elif char == "\\" and index + 1 < end:
                index += 1
                out.append(re.escape(pattern[index]))
            elif char == "[":
                close = pattern.find("]", index + 2 if pattern[index + 1:index + 2] in ("!", "^", "]") else index + 1)
                if close == -1 or close >= end:
                    out.append(re.escape(char))
                else:
                    body = pattern[index + 1:close]
                    negate = body[:1] in ("!", "^")
                    if negate:
                        body = body[1:]
                    body = _set_body(body)
                    if negate:
                        out.append("[^/" + body + "]")
                    else:
                        out.append("[" + body + "]" if body else "(?!)")
                    index = close
            else:
                out.append(re.escape(char))
            index += 1
        return "".join(out)


GLOB_OK, GLOB_ABORTED, GLOB_NOMATCH = 0, 2, 3


class Glob(object):
    """glob(3) with GLOB_BRACE (and GLOB_NOSORT when asked), calling `errfunc(path, errno)` on
    directories that cannot be read, as glibc does. `last_errno` is what errno holds afterwards."""

    def __init__(self, nosort, errfunc):
        self.nosort = nosort
        self.errfunc = errfunc
        self.last_errno = 0
        self.paths = []

    def run(self, pattern):
        before = len(self.paths)
        status = self._brace(pattern)
        if status == GLOB_OK and len(self.paths) == before:
            return GLOB_NOMATCH
        return status

    def _brace(self, pattern):
        begin = self._find_brace(pattern)
        if begin is None:
            return self._glob(pattern)
        end = _closing(pattern, begin, len(pattern), "{}")
        if end is None:
            return self._glob(pattern)
        prefix, rest = pattern[:begin], pattern[end + 1:]
        for start, stop in _top_level_parts(pattern, begin + 1, end, ",", "{}"):
            status = self._brace(prefix + pattern[start:stop] + rest)
            if status not in (GLOB_OK, GLOB_NOMATCH):
                return status
        return GLOB_OK

    @staticmethod
    def _find_brace(pattern):
        index = 0
        while index < len(pattern):
            if pattern[index] == "\\":
                index += 2
                continue
            if pattern[index] == "{":
                return index
            index += 1
        return None


    def _glob(self, pattern):
        """One brace-free pattern; its matches are appended (sorted among themselves)."""
        results = []
        status = self._expand(pattern, results)
        if status == GLOB_ABORTED:
            return status
        if not self.nosort:
            results.sort(key=lambda path: path.encode("utf-8", "surrogateescape"))
        self.paths.extend(results)
        return GLOB_OK if results else GLOB_NOMATCH

    def _expand(self, pattern, results):
        if "/" in pattern:
            dirname, filename = pattern.rsplit("/", 1)
            if dirname == "":
                dirname = "/"
        else:
            dirname, filename = None, pattern
        if dirname is not None and has_magic(dirname):
            directories = []
            status = self._expand(dirname, directories)
            if status == GLOB_ABORTED:
                return status
            for directory in directories:
                if os.path.isdir(directory):
                    if self._in_dir(filename, directory, results) == GLOB_ABORTED:
                        return GLOB_ABORTED
            return GLOB_OK
        return self._in_dir(filename, dirname, results)

    def _in_dir(self, filename, directory, results):
        def join(name):
            if directory is None:
                return name
            return directory + name if directory.endswith("/") else directory + "/" + name

        if not has_magic(filename):
            try:
                os.lstat(join(filename))
            except OSError as exc:
                self.last_errno = exc.errno
                return GLOB_OK
            results.append(join(filename))
            return GLOB_OK
        try:
            names = os.listdir(directory if directory is not None else ".")
        except OSError as exc:
            if exc.errno != errno.ENOTDIR and self.errfunc(directory or ".", exc.errno):
                return GLOB_ABORTED
            return GLOB_OK
        matcher = Pattern(filename, period=True)
        results.extend(join(name) for name in names if matcher.match(name))
        return GLOB_OK
