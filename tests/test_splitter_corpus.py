"""The statement splitter against ClickHouse itself, over a generated corpus and the repo's migrations.

The oracle is the engine, not a second copy of our rules:

- `tokenizeQuery(text)` runs ClickHouse's own lexer (the one every query goes through) and returns
  each token's byte range and type. A multi-statement text ends a statement only at a `Semicolon`
  token: the parser never takes a `;` into a statement (inline data after `INSERT ... FORMAT` is read
  by a format, not by the SQL parser, and is not covered here), and a `;` inside a string, quoted
  name, heredoc or comment is part of that token, never a `Semicolon`. So the statements ClickHouse sees
  are the runs of tokens between `Semicolon` tokens that hold something other than whitespace and
  comments, each from its first to its last non-whitespace token. The splitter must return exactly
  these texts: the same number of pieces, cut at the same places.
- `formatQuerySingleLineOrNull(piece)` runs ClickHouse's parser on one piece: it is NULL unless
  the piece is exactly one statement (two statements are refused as a multi-statement). So every
  piece of valid SQL must come back non-NULL, and a piece that holds a stray `#` must come back
  NULL (the `#` is an error token there, not a comment that hid a `;`).

The corpus combines fragments programmatically: every comment style (`--`, `//`, `# `, `#!`, block,
nested block), strings in every quote style with doubled-quote and backslash escapes, heredocs,
`#` in every position, `$` in names, `{db}` in every construct, each with `;` inside it, placed at
the start, middle and end of statements and between them. A coverage check makes sure the engine
really saw a `;` inside each kind of token, so the corpus cannot quietly lose a case. Seeded random
text from the characters that matter is compared on cut points alone, which also covers the corners
of the lexer (numbers such as `1e--x`, `$` inside names, unclosed quotes, Unicode spaces).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from backfill_plugin.spec.render import Raw, placeholders, render
from migrator.errors import MigrateError
from migrator.sqltext import split_statements, substitute_db

REPO = Path(__file__).resolve().parent.parent
DB = "prod_db"

# values: expressions with a `;` (or a quote, comment or heredoc mark) inside them
EXPRS = {
    "sq": "'a;b'",
    "sq_doubled_quote": "'it''s; fine'",
    "sq_backslash_quote": "'back\\'s; x'",
    "sq_ends_in_backslash": "'ends\\\\'",
    "sq_comment_marks": "'-- no; /* no; // no; # no;'",
    "sq_hash_forms": "'#x;#!y;# z;'",
    "sq_heredoc_marks": "'$$;$t$;'",
    "sq_multiline": "'a;\n-- b;\nc'",
    "sq_db": "'{db};'",
    "sq_concat": "'a;' || 'b;'",
    "heredoc": "$$a;b$$",
    "heredoc_tag": "$tag$a;b$tag$",
    "heredoc_inner_dollars": "$t$ $$; $x$; $t$",
    "heredoc_quotes": "$$it's; \"x;`$$",
    "heredoc_comment_marks": "$q$-- ;/* ;# ;$q$",
    "heredoc_hash": "$$#x;$$",
    "heredoc_db": "$${db};$$",
    "heredoc_multiline": "$h$\n;\n$h$",
    "unicode_sq": "\u2018a;b\u2019",
    "hex_string": "x'41'",
    "bin_string": "b'0101'",
    "number_exponent": "1e-5",
    "number_separators": "1_000",
    "number_hex": "0x1F",
}
# names with a `;` inside them, in alias position
ALIASES = {
    "dq": '"a;b"',
    "dq_doubled_quote": '"q""d;"',
    "dq_backslash_quote": '"b\\";c"',
    "bt": "`a;b`",
    "bt_doubled": "`t``;`",
    "bt_hash": "`#x;`",
    "bt_db": "`{db};`",
    "unicode_dq": "\u201ca;b\u201d",
    "dollar_in_name": "a$b",
    "dollar_name": "$x",
}
# comments, each with a `;` inside; line comments carry their newline
COMMENTS = {
    "dash": "-- c; d\n",
    "dash_no_space": "--c;'\n",
    "dash_quotes": "-- it's; \"x `y $$\n",
    "slash": "// c; d\n",
    "hash_space": "# c; d\n",
    "hash_bang": "#!c; d\n",
    "hash_bang_bare": "#!\n",
    "hash_after_dash": "-- #x;\n",
    "block": "/* c; d */",
    "block_nested": "/* a /* b; */ c; */",
    "block_nested_deep": "/* 1 /* 2 /* 3; */ ; */ ; */",
    "block_quotes": "/* ' \" ` $$ ; */",
    "block_line_marks": "/* -- ; # ;\n ; */",
    "block_slash_star": "/*/ ; */",
    "block_hash": "/* #x; */",
    "dash_block_open": "-- /* ;\n",
    "hash_block_open": "# /* ;\n",
    "dash_db": "-- copies into {db}.x;\n",
    "block_db": "/* {db}; */",
}
# a `#` where ClickHouse makes it an error token: the statement is invalid, the `;` after it still splits
HASH_ERRORS = {"hash_word": "#x", "hash_tab": "#\tx", "hash_semicolon": "#;", "hash_bare": "#"}
SEPARATORS = [";\n", ";", " ;; ", ";\n-- between; here\n", ";/* x; */;", "\n;\n"]


def statement(k: int, pre: str = "", mid: str = "", col: str = "", post: str = "") -> str:
    return f"{pre}SELECT {mid}{k}{col}{post}"


def join(stmts: list[str], sep: str = ";\n", tail: str = "") -> str:
    return sep.join(stmts) + tail


def generated_corpus() -> list[tuple[str, str, bool]]:
    """(name, text, valid) cases; `valid` is False only where a stray `#` is meant to be an error."""
    cases: list[tuple[str, str, bool]] = []
    cols = {f"expr_{n}": f", {e} AS c" for n, e in EXPRS.items()}
    cols.update({f"alias_{n}": f" AS {a}" for n, a in ALIASES.items()})
    for cname, col in cols.items():  # every value/name in every statement position, with every separator
        for s, sep in enumerate(SEPARATORS):
            cases.append((f"{cname}/first/sep{s}", join([statement(1, col=col), statement(2), statement(3)], sep), True))
            cases.append((f"{cname}/last/sep{s}", join([statement(1), statement(2, col=col)], sep, tail=sep), True))
        cases.append((f"{cname}/alone", statement(1, col=col), True))
    for mname, comment in COMMENTS.items():  # every comment in every slot
        slots = {
            "before": [statement(1, pre=comment), statement(2)],
            "inside": [statement(1, mid=comment), statement(2)],
            "after": [statement(1, post=" " + comment), statement(2)],
            "between": [statement(1), comment + statement(2)],
            "alone": [statement(1), comment, statement(2)],
        }
        for slot, stmts in slots.items():
            for s, sep in enumerate(SEPARATORS[:3]):
                cases.append((f"{mname}/{slot}/sep{s}", join(stmts, sep), True))
        cases.append((f"{mname}/trailing", join([statement(1), statement(2)]) + ";\n" + comment.rstrip("\n"), True))
        cases.append((f"{mname}/only", comment + ";\n" + comment, True))
        for cname, col in cols.items():  # each comment next to each quoted thing
            cases.append((f"{mname}+{cname}", join([statement(1, mid=comment, col=col, post=" " + comment),
                                                   statement(2)]), True))
    for hname, bad in HASH_ERRORS.items():  # a stray `#` in each position: an error, never a comment
        for slot, stmts in {
            "start": [bad + "\n" + statement(1), statement(2)],
            "inside": [statement(1, mid=bad + "\n"), statement(2)],
            "end": [statement(1, post=" " + bad), statement(2)],
            "last": [statement(1), statement(2, post=" " + bad)],
        }.items():
            cases.append((f"{hname}/{slot}", join(stmts, ";\n"), False))
    rng = random.Random(13)  # mixtures: several fragments in one text, seeded so a failure reproduces
    fragments = list(EXPRS.values())
    for m in range(150):
        stmts = []
        for k in range(rng.randint(2, 4)):
            col = rng.choice([f", {rng.choice(fragments)} AS c", f" AS {rng.choice(list(ALIASES.values()))}", ""])
            stmts.append(statement(k, pre=rng.choice(["", *COMMENTS.values()]), mid=rng.choice(["", *COMMENTS.values()]),
                                   col=col, post=rng.choice(["", " " + rng.choice(list(COMMENTS.values()))])))
        cases.append((f"mix{m}", join(stmts, rng.choice(SEPARATORS), tail=rng.choice(["", ";", ";\n-- end;"])), True))
    # the three shapes of issue 13, verbatim
    cases += [("issue/nested", "SELECT 1 /* a /* b; */ c; */; SELECT 2", True),
              ("issue/heredoc", "SELECT $$a;b$$; SELECT $tag$x;y$tag$", True),
              ("issue/hash", "SELECT 1 # a; b\n; SELECT 2 #!c; d\n; SELECT 3", True)]
    return [(name, substitute_db(text, DB), valid) for name, text, valid in cases]


def migration_texts() -> list[tuple[str, str]]:
    """Every SQL file in migrations/, as it is sent: `{db}` substituted, backfill placeholders stood in for."""
    out = []
    for path in sorted((REPO / "migrations").glob("*.sql")):
        text = substitute_db(path.read_text(), DB)
        if ".backfill." in path.name:  # stand-ins that parse: a predicate for the range, 0 for the rest
            values = {name: 0 for name in placeholders(text)}
            values["batch_range"] = Raw("1 = 1")
            text, _ = render(text, values, path)
        out.append((path.name, text))
    return out


def engine_statements(client, texts: list[str]) -> list[list[str]]:
    """The statements ClickHouse's lexer sees in each text (see the module docstring)."""
    out = []
    for chunk in range(0, len(texts), 200):
        part = texts[chunk:chunk + 200]
        tokens = client.query("SELECT arrayMap(q -> tokenizeQuery(q), {qs:Array(String)})",
                              parameters={"qs": part}).result_rows[0][0]
        for text, toks in zip(part, tokens):
            raw, stmts, current = text.encode(), [], []
            for tok in [*toks, {"type": "Semicolon"}]:
                if tok["type"] != "Semicolon":
                    current.append(tok)
                    continue
                if any(t["type"] not in ("Whitespace", "Comment") for t in current):
                    kept = [t for t in current if t["type"] != "Whitespace"]
                    stmts.append(raw[kept[0]["begin"]:kept[-1]["end"]].decode())
                current = []
            out.append(stmts)
    return out


def parse_one(client, pieces: list[str]) -> list[bool]:
    """Whether ClickHouse's parser takes each piece as exactly one statement."""
    out = []
    for chunk in range(0, len(pieces), 500):
        out += client.query("SELECT arrayMap(p -> formatQuerySingleLineOrNull(p) IS NOT NULL, {ps:Array(String)})",
                            parameters={"ps": pieces[chunk:chunk + 500]}).result_rows[0][0]
    return out


def semicolons_inside_tokens(client, texts: list[str]) -> set[str]:
    """Which kinds of token the engine saw with a `;` inside, keyed by type and opening characters."""
    seen = set()
    tokens = client.query("SELECT arrayMap(q -> tokenizeQuery(q), {qs:Array(String)})",
                          parameters={"qs": texts}).result_rows[0][0]
    for text, toks in zip(texts, tokens):
        raw = text.encode()
        for t in toks:
            body = raw[t["begin"]:t["end"]].decode()
            if t["type"] != "Semicolon" and ";" in body:
                opening = body[:2] if t["type"] in ("Comment", "HereDoc") else body[:1]
                nested = "/*" in body[2:] and t["type"] == "Comment" and body.startswith("/*")
                seen.add(f"{t['type']} {opening}{' nested' if nested else ''}")
    return seen


def check(client, cases: list[tuple[str, str, bool]]) -> list[str]:
    """Every disagreement between the splitter and the engine, one line each."""
    problems = []
    expected = engine_statements(client, [text for _, text, _ in cases])
    got = [split_statements(text) for _, text, _ in cases]
    parsed = iter(parse_one(client, [p for pieces in got for p in pieces]))
    for (name, text, valid), want, pieces in zip(cases, expected, got):
        if pieces != want:
            problems.append(f"{name}: {text!r}\n    splitter {pieces!r}\n    engine   {want!r}")
        for piece in pieces:
            ok = next(parsed)
            if valid and not ok:
                problems.append(f"{name}: engine cannot parse the piece {piece!r} as one statement")
            if not valid and ok == any(bad in piece for bad in HASH_ERRORS.values()):
                problems.append(f"{name}: piece {piece!r} {'parses' if ok else 'does not parse'}")
    return problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} disagreements with ClickHouse, first ones:\n" + "\n".join(problems[:15])


def test_generated_corpus_splits_as_clickhouse_does(ch_client):
    cases = generated_corpus()
    assert len(cases) >= 500
    problems = check(ch_client, cases)
    assert not problems, report(problems)


def test_corpus_puts_a_semicolon_inside_every_kind_of_token(ch_client):
    """Guards the corpus itself: the engine must see a `;` inside each construct, or a case went missing."""
    seen = semicolons_inside_tokens(ch_client, [text for _, text, _ in generated_corpus()])
    assert {
        "Comment --", "Comment //", "Comment # ", "Comment #!", "Comment /*", "Comment /* nested",
        "StringLiteral '", "StringLiteral \u2018", "QuotedIdentifier \"", "QuotedIdentifier `",
        "QuotedIdentifier \u201c", "HereDoc $$", "HereDoc $t",
    } <= seen, seen


def test_repo_migrations_split_as_clickhouse_does(ch_client):
    texts = migration_texts()
    assert {name for name, _ in texts} >= {"001_trace_schema.up.sql", "021_calls_complete.backfill.sql"}
    cases = [(name, text, True) for name, text in texts]
    problems = check(ch_client, cases)
    assert not problems, report(problems)
    counts = {name: len(split_statements(text)) for name, text in texts}
    assert counts["021_calls_complete.backfill.sql"] == 1 and counts["001_trace_schema.up.sql"] >= 3, counts


FUZZ_ALPHABET = [*";;;''\"`$$##--//**..e1_x0b \n\t\\!\u2018\u2019\u201c\u201dGpEP+aX9\u00a0\u2003\u1680\ufeff",
                 "$t$", "/*", "*/", "# ", "#!", "0x", "0b1", "1e-", ".5", "1_0", "x'", "->", "SELECT ", "\\G"]


def test_random_text_is_cut_where_the_engine_lexer_cuts_it(ch_client):
    """Mostly invalid SQL from the characters that matter (quotes, `$`, `#`, `-`, `/`, `*`, numbers, dots,
    Unicode quotes and spaces): only the cut points are compared, against `tokenizeQuery`."""
    rng = random.Random(2024)
    texts = ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    expected = engine_statements(ch_client, texts)
    problems = [f"{text!r}\n    splitter {split_statements(text)!r}\n    engine   {want!r}"
                for text, want in zip(texts, expected) if split_statements(text) != want]
    assert sum(len(w) > 1 for w in expected) > 400  # many texts really hold several statements
    assert not problems, report(problems)


def test_stray_hash_never_hides_a_semicolon():
    assert split_statements("SELECT 1 #x; SELECT 2") == ["SELECT 1 #x", "SELECT 2"]
    assert split_statements("SELECT 1 #\tx; SELECT 2") == ["SELECT 1 #\tx", "SELECT 2"]
    assert split_statements("#; SELECT 2") == ["#", "SELECT 2"]
    assert split_statements("SELECT 1 # x; y\n; SELECT 2 #!x; y") == ["SELECT 1 # x; y", "SELECT 2 #!x; y"]


def test_unclosed_constructs_run_to_the_end_as_in_clickhouse(ch_client):
    """Broken input: the engine's lexer swallows the rest of the text, so nothing after it is split."""
    texts = ["SELECT 'a; SELECT 2", "SELECT /* a /* b */ ; SELECT 2", "SELECT `a; SELECT 2",
             "SELECT x'4Z'; SELECT 2", "SELECT \u2018a; SELECT 2"]
    assert engine_statements(ch_client, texts) == [[t] for t in texts]
    assert [split_statements(t) for t in texts] == [[t] for t in texts]
    assert not any(parse_one(ch_client, texts))


# -- {db}: replaced everywhere, in names, strings and comments alike ----------------------------------

def test_db_is_replaced_in_names_strings_and_comments_but_other_braces_stay():
    sql = ("-- copies into {db}.x\nINSERT INTO {db}.x SELECT '{db}', $${db}$$, 1 AS `{db}_n` /* from {db} */ "
           "FROM {db}.y WHERE db = {db:String} AND path = '/t/{shard}/{database}'")
    assert substitute_db(sql, "prod_1") == (
        "-- copies into prod_1.x\nINSERT INTO prod_1.x SELECT 'prod_1', $$prod_1$$, 1 AS `prod_1_n` /* from prod_1 */ "
        "FROM prod_1.y WHERE db = {db:String} AND path = '/t/{shard}/{database}'")


def test_db_in_a_string_reaches_the_engine_as_the_database_name(ch_client, db, migrations, migrator_for):
    """A migration that looks itself up in system.tables by '{db}', the common reason to write it in a string."""
    root = migrations(1, "seen", """
        -- creates {db}.t, then records how many tables {db} holds; a comment with {db}; in it
        CREATE TABLE {db}.t (s String DEFAULT '{db}', h String DEFAULT $h${db};$h$) ENGINE = MergeTree ORDER BY s;
        INSERT INTO {db}.t (s) VALUES ('{db}');
        CREATE TABLE {db}.seen ENGINE = MergeTree ORDER BY n AS
            SELECT count() AS n FROM system.tables WHERE database = '{db}' AND name = 't';
        """, "DROP TABLE {db}.seen; DROP TABLE {db}.t")
    stmts = migrator_for(db, root).statements(root / "001_seen.up.sql")
    assert len(stmts) == 3 and "{db}" not in "".join(stmts)
    assert stmts[0].startswith(f"-- creates {db}.t, then records how many tables {db} holds; a comment with {db}; in it")
    assert migrator_for(db, root).up() == [1]
    assert ch_client.query(f"SELECT s, h FROM {db}.t").result_rows == [(db, f"{db};")]
    assert ch_client.command(f"SELECT n FROM {db}.seen") == 1


@pytest.mark.parametrize("name", ["x; DROP TABLE y", "a'b", "a*/b", "a\nb", "a$b"])
def test_db_name_that_could_change_the_split_is_refused(name):
    with pytest.raises(MigrateError, match="is not a valid identifier"):
        substitute_db("SELECT '{db}' /* {db} */", name)
