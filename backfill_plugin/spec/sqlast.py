"""What the engine's own parser says a backfill statement is, rather than what a pattern guesses.

`EXPLAIN AST` (measured on the embedded engine, 26.x) parses `WITH ... INSERT`, `INSERT ... WITH`,
`INSERT ... SELECT ... UNION ALL`, comments anywhere and quoted identifiers alike, writes nothing and
plans nothing: the root node is the statement's kind, an `InsertQuery`'s leading `Identifier`
children are its target (database, table), a `Function` child there is a table function, and every
`Function`, `Identifier`, `TableIdentifier` and string `Literal` below is printed one per line.
`system.functions` says which functions the engine itself holds non-deterministic (its
`deterministic` column; `is_deterministic` on some versions; absent on old ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from migrator import transport

from ..errors import BackfillError, one_line

_NODE = re.compile(r"^( *)(\S+)(?: (.*?))?(?: \(children \d+\))?$")
_ALIAS = re.compile(r" \(alias [^()]*\)$")
# Functions the engine calls non-deterministic that give the same value when a batch is replayed on the
# same server and data: about the server, the session or the column, or lookups into stored data.
SAME_ON_REPLAY = {
    "arrayjoin",
    "joinget",
    "joingetornull",
    "currentdatabase",
    "currentuser",
    "currentroles",
    "currentschemas",
    "enabledroles",
    "defaultroles",
    "enabledprofiles",
    "defaultprofiles",
    "currentprofiles",
    "authenticateduser",
    "isconstant",
    "getmacro",
    "version",
    "revision",
    "buildid",
    "hostname",
    "fqdn",
    "shardnum",
    "shardcount",
    "getsetting",
    "getsettingordefault",
    "getmergetreesetting",
    "getserversetting",
    "tocolumntypename",
    "dumpcolumnstructure",
    "hascolumnintable",
    "displayname",
    "serveruuid",
    "tcpport",
    "getserverport",
    "timezone",
    "servertimezone",
    "getoskernelversion",
}
# Used when the server's system.functions has no deterministic column (older servers).
NON_DETERMINISTIC = {
    "now",
    "now64",
    "nowinblock",
    "nowinblock64",
    "today",
    "yesterday",
    "rand",
    "rand32",
    "rand64",
    "randconstant",
    "randcanonical",
    "randuniform",
    "randnormal",
    "randomstring",
    "randomfixedstring",
    "randomprintableascii",
    "randomstringutf8",
    "generateuuidv4",
    "generateuuidv7",
    "generatesnowflakeid",
    "generateserialid",
    "rownumberinblock",
    "rownumberinallblocks",
    "blocknumber",
    "currenttimestamp",
    "utctimestamp",
    "current_timestamp",
    "localtimestamp",
    "localtime",
    "curdate",
    "current_date",
    "utc_timestamp",
    "arrayshuffle",
    "arraypartialshuffle",
    "arrayrandomsample",
    "fuzzbits",
    "queryid",
    "initialqueryid",
    "currentqueryid",
    "uptime",
}


@dataclass
class Shape:
    """A parsed statement: its kind, an INSERT's target, and the names and functions it mentions."""

    kind: str
    target: tuple[str | None, str] | None = None  # (database or None when unqualified, table)
    table_function: str | None = None  # INSERT INTO FUNCTION name(...)
    names: set[str] = field(default_factory=set)  # identifiers, table identifiers, string literals
    functions: set[str] = field(default_factory=set)
    tables: set[str] = field(default_factory=set)  # TableIdentifier nodes: `t` or `db.t` (CTE names too)
    has_select: bool = False  # an INSERT ... SELECT rather than VALUES / FORMAT

    @property
    def is_insert(self) -> bool:
        return self.kind == "InsertQuery"

    def target_in(self, database: str) -> tuple[str, str] | None:
        """The target as (database, table), an unqualified one in `database`."""
        return None if self.target is None else (self.target[0] or database, self.target[1])

    def mentions(self, name: str, databases: tuple[str, ...]) -> bool:
        """Whether an object `name` (in one of `databases`, or unqualified) may be read: as a table, in
        `IN name`, by a dictGet('db.name', ...) or joinGet, or as a function (a user-defined one)."""
        low = name.lower()
        if low in {f.lower() for f in self.functions}:
            return True
        wanted = {low} | {f"{d}.{name}".lower() for d in databases}
        return any(n.lower() in wanted or n.lower().endswith("." + low) for n in self.names)


def parse(client, sql: str, params: dict | None, path, rename: dict | None = None) -> Shape:
    """EXPLAIN AST of one statement; a syntax error is one line naming `path` (nothing runs)."""
    try:
        raw = client.raw_query(f"EXPLAIN AST {sql}", parameters=params or None, fmt="TabSeparatedRaw")
    except Exception as exc:
        raise refusal(exc, path, rename) from None
    return read(raw.decode("utf-8", "replace").splitlines())


def refusal(exc: Exception, path, rename: dict | None = None) -> BackfillError:
    """The engine's refusal of a statement as one line naming `path` (a scratch database named back as the
    real one); a fault on the way to the server is raised as it is, so that its caller says the SQL was not
    checked rather than blaming it."""
    if transport.cause(exc):
        raise exc
    message = one_line(exc)
    for scratch, real in (rename or {}).items():
        message = message.replace(scratch, real)
    return BackfillError(f"{path}: {message}")


def read(lines: list[str]) -> Shape:
    """The Shape of `EXPLAIN AST` output (one node a line, indented by depth)."""
    nodes = []
    for line in lines:
        match = _NODE.match(line.rstrip())
        if match:
            nodes.append((len(match.group(1)), match.group(2), _ALIAS.sub("", match.group(3) or "")))
    if not nodes:
        raise BackfillError("the engine's parser returned no statement")
    root_depth, kind, _ = nodes[0]
    shape = Shape(kind)
    head, reading_head = [], kind == "InsertQuery"  # an InsertQuery's leading Identifier children: its target
    for depth, node, value in nodes[1:]:
        if reading_head and depth == root_depth + 1:
            if node == "Identifier":
                head.append(value)
                continue
            if node == "Function" and not head:
                shape.table_function = value
            reading_head = False
        shape.has_select |= node == "SelectWithUnionQuery"
        if node == "Function":
            shape.functions.add(value)
        elif node in ("Identifier", "TableIdentifier"):
            shape.names.add(value)
            if node == "TableIdentifier":
                shape.tables.add(value)
        elif node == "Literal" and value.startswith("\\'"):
            shape.names.add(value[2:-2].replace("\\\\", "\\").replace("\\'", "'"))
    if head:
        shape.target = (head[0], head[1]) if len(head) == 2 else (None, head[0])
    return shape


def nondeterministic(client) -> tuple[set[str], set[str]]:
    """(names matched exactly, names matched in any case) of the functions a replay would see change: the
    engine's own non-deterministic functions except SAME_ON_REPLAY (NON_DETERMINISTIC on older servers)."""
    columns = {
        r[0]
        for r in client.query(
            "SELECT name FROM system.columns WHERE database = 'system' AND table = 'functions' "
            "AND name IN ('deterministic', 'is_deterministic', 'categories')"
        ).result_rows
    }
    column = next((c for c in ("deterministic", "is_deterministic") if c in columns), None)
    if column is None:
        return set(), set(NON_DETERMINISTIC)
    category = "categories" if "categories" in columns else "''"
    rows = client.query(
        f"SELECT name, case_insensitive, if(alias_to = '', name, alias_to), {category} "
        f"FROM system.functions WHERE {column} = 0"
    ).result_rows
    lookups = {original.lower() for _, _, original, cat in rows if cat == "Dictionary"}  # dictGet*, dictHas...
    exact, any_case = set(), set()
    for name, insensitive, original, _ in rows:
        if not {original.lower(), name.lower()} & (SAME_ON_REPLAY | lookups):
            (any_case if insensitive else exact).add(name.lower() if insensitive else name)
    return exact, any_case
