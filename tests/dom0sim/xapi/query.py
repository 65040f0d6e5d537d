"""xapi's filter expressions, as `<class>.get_all_records_where` takes them: `field "SR" = "OpaqueRef:..."`.

The language: `value = value` where a value is a "string" literal or `field "<column>"`; `true`, `false`,
`not`, `and`, `or` and parentheses. Like xapi's parser, `and` and `or` have one precedence and group to
the left (`a or b and c` is `(a or b) and c`), and `not` reaches as far right as it can (`not a and b` is
`not (a and b)`). A comparison is between strings: a field's value is the string xapi's database holds
for it, and its name is the database column, so namespaced fields are spelled with two underscores
(`name__label`, `memory__static_max`, `qos__algorithm_type`). As in xapi, a field is looked up only
when a record is tested, so a column the class lacks fails on the first record, not at parse time.
"""
import collections

from . import schema, wire

WHITESPACE = " \t\n"
SYMBOLS = {"=": "EQ", "(": "LPAREN", ")": "RPAREN"}
KEYWORDS = ("true", "false", "field", "and", "or", "not")
DESCRIPTIONS = {"EQ": "'='", "RPAREN": "')'", "STRING": "a string", "EOF": "the end"}
REF_COLUMN = "_ref"
# Namespaces whose fields xapi stores as "<namespace>__<rest>": VM.memory_target is column memory__target.
NAMESPACES = {
    "host": ("name", "memory", "API_version"),
    "SR": ("name",),
    "VDI": ("name",),
    "VBD": ("qos",),
    "VM": ("name", "memory", "VCPUs", "actions", "PV", "HVM"),
    "task": ("name",),
}

Token = collections.namedtuple("Token", "kind text offset")


class QueryError(ValueError):
    """An expression that does not parse, or a field the class does not have."""


# ---- parsing -----------------------------------------------------------------------------------

def parse(text):
    """The predicate of an expression: predicate(value_of) -> bool, where value_of(column) -> str."""
    if not isinstance(text, str):
        raise QueryError("filter expression must be a string, not {}".format(type(text).__name__))
    return _Parser(text).complete_expression()


def _tokens(text):
    position = 0
    while position < len(text):
        char = text[position]
        if char in WHITESPACE:
            position += 1
        elif char in SYMBOLS:
            yield Token(SYMBOLS[char], char, position)
            position += 1
        elif char == '"':
            end = text.find('"', position + 1)
            if end < 0:
                raise QueryError("unterminated string at offset {} in filter expression {!r}".format(position, text))
            yield Token("STRING", text[position + 1:end], position)
            position = end + 1
        else:
            keyword = next((word for word in KEYWORDS if text.startswith(word, position)), None)
            if keyword is None:
                raise QueryError("unexpected {!r} at offset {} in filter expression {!r}".format(char, position, text))
            yield Token(keyword.upper(), keyword, position)
            position += len(keyword)
    yield Token("EOF", "", len(text))


class _Parser(object):
    def __init__(self, text):
        self.text = text
        self.tokens = list(_tokens(text))
        self.position = 0

    def complete_expression(self):
        predicate = self.expression()
        self.expect("EOF")
        return predicate

    def expression(self):
        """A chain of operands joined by `and`/`or`, grouped to the left."""
        predicate = self.operand()
        while self.peek().kind in ("AND", "OR"):
            operator = self.take().kind
            predicate = _combine(operator, predicate, self.operand())
        return predicate

    def operand(self):
        token = self.peek()
        if token.kind == "NOT":
            self.take()
            negated = self.expression()
            return lambda value_of: not negated(value_of)
        if token.kind in ("TRUE", "FALSE"):
            self.take()
            constant = token.kind == "TRUE"
            return lambda value_of: constant
        if token.kind == "LPAREN":
            self.take()
            inner = self.expression()
            self.expect("RPAREN")
            return inner
        left = self.value()
        self.expect("EQ")
        right = self.value()
        return lambda value_of: left(value_of) == right(value_of)

    def value(self):
        token = self.take()
        if token.kind == "STRING":
            return lambda value_of: token.text
        if token.kind == "FIELD":
            column = self.expect("STRING").text
            return lambda value_of: value_of(column)
        raise self.error(token, "a string or 'field'")

    def peek(self):
        return self.tokens[self.position]

    def take(self):
        token = self.tokens[self.position]
        if token.kind != "EOF":
            self.position += 1
        return token

    def expect(self, kind):
        token = self.take()
        if token.kind != kind:
            raise self.error(token, DESCRIPTIONS[kind])
        return token

    def error(self, token, wanted):
        found = DESCRIPTIONS[token.kind] if token.kind in ("STRING", "EOF") else repr(token.text)
        return QueryError("expected {} but found {} at offset {} in filter expression {!r}".format(
            wanted, found, token.offset, self.text))


def _combine(operator, left, right):
    if operator == "AND":
        return lambda value_of: left(value_of) and right(value_of)
    return lambda value_of: left(value_of) or right(value_of)


# ---- the database's strings --------------------------------------------------------------------

def column_name(cls, field_name):
    """The database column of an API field: VM.name_label is name__label."""
    for namespace in NAMESPACES.get(cls, ()):
        if field_name.startswith(namespace + "_"):
            return namespace + "__" + field_name[len(namespace) + 1:]
    return field_name


def columns(cls):
    """{column: Field} of a class."""
    return collections.OrderedDict((column_name(cls, f.name), f) for f in schema.CLASSES[cls])


def database_string(kind, value):
    """A stored value as xapi's database writes it: sets and maps as its S-expressions."""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "int":
        return str(value)
    if kind == "float":
        return "%.18g" % value
    if kind == "date":
        return value.strftime(wire.DATE_FORMAT)
    if kind in ("refs", "strs", "ints"):
        return "({})".format(" ".join(_quoted(str(item)) for item in value))
    if kind == "map":
        return "({})".format(" ".join("({} {})".format(_quoted(k), _quoted(v)) for k, v in value.items()))
    return value


def _quoted(text):
    return "'{}'".format(text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'"))


def select(cls, records, text):
    """The {ref: record} of `records` (stored records of `cls`) that the expression accepts, in order."""
    predicate = parse(text)
    kinds = columns(cls)
    return collections.OrderedDict((ref, record) for ref, record in records.items()
                                   if predicate(_reader(cls, kinds, ref, record, text)))


def _reader(cls, kinds, ref, record, text):
    def value_of(column):
        if column == REF_COLUMN:
            return ref
        field = kinds.get(column)
        if field is None:
            raise QueryError("{} has no field {!r} (filter expression {!r})".format(cls, column, text))
        return database_string(field.kind, record[field.name])
    return value_of
