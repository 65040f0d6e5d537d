"""The option handling every `vhd-util` command shares: glibc getopt, then the command's getopt
loop, which takes the options in order (the last value of one wins) and stops at `-h` or an
option it does not know to print its usage."""
import errno

from tests.dom0sim.vhdutil_libc import getopt


class CommandLine(object):
    """One command's arguments: `options` ([(option, value)] before the stop), `values` (the last
    value of each of them), `operands`, and `stop` ("h", "?" or None)."""

    def __init__(self, args, optstring, prog, out, usage, help_succeeds=False):
        options, self.operands = getopt(args, optstring, prog, out)
        stops = [index for index, (opt, _) in enumerate(options) if opt in ("h", "?")]
        self.stop = options[stops[0]][0] if stops else None
        self.options = options[:stops[0]] if stops else options
        self.values = dict(self.options)
        self._out = out
        self._usage = usage
        self._help_succeeds = help_succeeds

    def given(self, opt):
        return opt in self.values

    def get(self, opt, default=None):
        return self.values.get(opt, default)

    def incomplete(self, *required):
        """True when the loop stopped, operands are left over or a `required` option is missing."""
        return self.stop is not None or bool(self.operands) or not all(map(self.given, required))

    def usage(self):
        """Print the usage; the status is 0 after `-h` for the commands where help succeeds, else -EINVAL."""
        self._out.write(self._usage)
        return 0 if self._help_succeeds and self.stop == "h" else -errno.EINVAL
