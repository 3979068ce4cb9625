"""`atmoe-reg list` at team scale: paging, streamed --json, --search, and the reader that opens a
healthy catalog without SQLAlchemy.

Runs on the test's backend: SQLite, or PostgreSQL under ATMOE_TEST_PG=1 (then one test also lists
the same rows from a SQLite file and compares). Search results are checked against a plain-Python
reading of the rules in ``registry/search.py`` (``expected``), on both engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text

sys.path.insert(0, str(Path(__file__).parent))
from conftest import PG_ENABLED  # noqa: E402
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.cli import output  # noqa: E402
from atmoe.registry import Registry, db, listing, reader, search  # noqa: E402
from atmoe.registry.config import resolve  # noqa: E402
from atmoe.registry.experts import SessionReader  # noqa: E402
from atmoe.registry.models import Expert, Group  # noqa: E402

BULK = 120  # more than one piped page (output.PIPED_PAGE_ROWS)

# (name, group, domain, style, tags, description): the rows the search tests look into
NAMED: list[tuple[str, str, str | None, str | None, dict[str, str], str | None]] = [
    ("gastro-v2", "domain", "gastroenterology", None, {"team": "gi"}, "Colon polyps, café au lait spots"),
    ("dx_triage", "functional", None, "rigorous", {"ward": "oncology", "team": "onc"}, "Rigorous triage notes"),
    ("letters", "style", "cardiology", "concise", {}, "Discharge letters for the cardiology ward"),
    ("near-miss", "functional", None, None, {"stage": "dev"}, "NEAR misses AND errors (audit)"),
    ("A1", "general", None, None, {"team.lead": "kim"}, None),
    ("a-b", "general", None, None, {}, "punctuation: a-b"),
    ("a_b", "general", None, None, {}, None),
    ("a.b", "general", None, None, {}, None),
    ("aB", "general", None, None, {}, None),
    ("ab", "general", None, None, {}, None),
]


def _row(group_ids: dict[str, int], name: str, version: int, **columns: Any) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "group_id": group_ids[columns.pop("group", "functional")],
        "domain": None,
        "style": None,
        "tags": {},
        "description": None,
        "base_model": "org/llama-1b",
        "base_revision": None,
        "peft_type": "LORA",
        "r": 8,
        "alpha": 16.0,
        "use_rslora": False,
        "target_modules": ["q_proj"],
        "module_ranks": {},
        "rank_pattern": {},
        "alpha_pattern": {},
        "digest": hashlib.sha256(f"{name}@{version}".encode()).hexdigest(),
        "size": 1000 + version,
        **columns,
    }


def fill(registry: Registry, *, bulk: int = BULK) -> None:
    """``bulk`` rows bulk-p000..., two versions each, then the NAMED rows."""
    with registry.write() as session:
        group_ids = {g.name: g.id for g in session.scalars(select(Group))}
        rows = [
            _row(
                group_ids,
                f"bulk-p{i // 2:03d}",
                i % 2 + 1,
                group=("functional", "domain")[i % 2],
                domain=("cardiology", None, "gastroenterology")[i % 3],
                tags={"team": f"t{i % 4}"},
                description=f"release {i % 5} of the bulk set",
            )
            for i in range(bulk)
        ]
        rows += [
            _row(group_ids, name, 1, group=group, domain=domain, style=style, tags=tags, description=description)
            for name, group, domain, style, tags, description in NAMED
        ]
        session.execute(insert(Expert), rows)


@pytest.fixture
def catalog(registry: Registry) -> Registry:
    fill(registry)
    return registry


def listed(*args: str) -> list[dict[str, Any]]:
    return json.loads(ok("list", "--json", *args).stdout)


def refs(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['name']}@{r['version']}" for r in rows]


def table_refs(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["REF", "GROUP"], lines[0]
    return [line.split()[0] for line in lines[1:]]


# -- paging ------------------------------------------------------------------------------------------


def test_first_page_says_how_many_rows_there_are(catalog: Registry) -> None:
    every = listed()
    total = BULK + len(NAMED)
    assert len(every) == total
    assert refs(every) == sorted(refs(every), key=lambda ref: (ref.split("@")[0].encode(), int(ref.split("@")[1])))

    first = ok("list")
    assert table_refs(first.stdout) == refs(every)[: output.PIPED_PAGE_ROWS]
    assert first.stderr.strip() == (f"Showing 1-50 of {total} experts; more with --offset 50, --limit N or --all")
    middle = ok("list", "--limit", "7", "--offset", "45")
    assert table_refs(middle.stdout) == refs(every)[45:52]
    assert "Showing 46-52 of" in middle.stderr
    last = ok("list", "--offset", str(total - 3))
    assert table_refs(last.stdout) == refs(every)[-3:]
    assert last.stderr.strip() == f"Showing {total - 2}-{total} of {total} experts"  # nothing more to say
    everything = ok("list", "--all")
    assert table_refs(everything.stdout) == refs(every) and everything.stderr == ""
    beyond = ok("list", "--offset", "100000")
    assert beyond.stdout == "" and beyond.stderr.strip() == f"Nothing past --offset 100000: {total} experts match"


def test_filters_page_too(catalog: Registry) -> None:
    cardiology = listed("--domain", "cardiology")
    assert cardiology and all(r["domain"] == "cardiology" for r in cardiology)
    page = ok("list", "--domain", "cardiology", "--limit", "5")
    assert table_refs(page.stdout) == refs(cardiology)[:5]
    assert f"Showing 1-5 of {len(cardiology)} experts" in page.stderr
    assert refs(listed("--tag", "team.lead=kim")) == ["A1@1"]  # a dot in a tag key is no JSON path
    assert refs(listed("--tag", "team.lead")) == ["A1@1"]
    assert refs(listed("--tag", "team=t1", "--group", "domain", "--limit", "2")) == ["bulk-p000@2", "bulk-p002@2"]
    none = ok("list", "--group", "style", "--tag", "stage=dev")
    assert none.stdout == "" and none.stderr.strip() == "No experts match."


def test_json_is_every_row_unless_limited(catalog: Registry) -> None:
    every = listed()
    assert listed("--all") == every
    assert listed("--limit", "4", "--offset", "10") == every[10:14]
    assert listed("--offset", str(len(every) - 2)) == every[-2:]
    paged = ok("list", "--json", "--limit", "3")
    assert json.loads(paged.stdout) == every[:3] and "Showing 1-3 of" in paged.stderr
    whole = ok("list", "--json")
    assert whole.stderr == ""  # data alone: no note when every row is there


def test_long_json_is_streamed_as_one_array(catalog: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    with catalog.session() as session:
        expected = list(listing.summaries(SessionReader(session), listing.ExpertFilter()))
    monkeypatch.setattr(output, "PLAIN_TABLE_ROWS", 10)
    monkeypatch.setattr(output, "JSON_CHUNK_ROWS", 7)
    streamed = ok("list", "--json").stdout
    lines = streamed.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == len(expected) + 2  # one compact row per line
    assert json.loads(streamed) == json.loads(json.dumps(expected, default=lambda moment: moment.isoformat()))
    assert [json.loads(line.rstrip(",")) for line in lines[1:-1]] == json.loads(streamed)


def test_streamed_json_is_the_text_of_print_json(capsys: pytest.CaptureFixture[str]) -> None:
    items = [{"n": i, "when": None, "x": float("nan") if i == 3 else i / 2} for i in range(25)]
    for limit in (100, 10):  # indented, then one compact item per line
        output.PLAIN_TABLE_ROWS, saved = limit, output.PLAIN_TABLE_ROWS
        try:
            output.print_json(items)
            whole = capsys.readouterr().out
            output.print_json_rows(iter(items))
            assert capsys.readouterr().out == whole
        finally:
            output.PLAIN_TABLE_ROWS = saved
    assert json.loads(whole)[3]["x"] is None  # never NaN


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--limit", "0"), "0 is not in the range x>=1"),
        (("--limit", "-5"), "-5 is not in the range x>=1"),
        (("--limit", "ten"), "'ten' is not a valid integer"),
        (("--offset", "-1"), "-1 is not in the range x>=0"),
        (("--limit", "5", "--all"), "--limit and --all exclude each other"),
        (("--all", "--limit", "5", "--json"), "--limit and --all exclude each other"),
        (("--search", ""), "has no letter or digit"),
        (("--search", '"*()'), "has no letter or digit"),
        (("--search", " ".join(["w"] * (search.MAX_WORDS + 1))), f"give at most {search.MAX_WORDS}"),
        (("--tag", "../x=1"), "tag key '../x' looks like a path"),
    ],
)
def test_bad_listing_options_are_one_line_errors(
    catalog: Registry, snapshot: Callable[[], Any], args: tuple[str, ...], fragment: str
) -> None:
    before = snapshot()
    result = invoke("list", *args)
    assert_one_line(result, 2, fragment)
    assert result.stdout == "" and snapshot() == before


def test_default_page_is_one_screen_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert output.screen_rows() == output.PIPED_PAGE_ROWS  # pytest's stdout is no terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(output.shutil, "get_terminal_size", lambda: os.terminal_size((120, 40)))
    assert output.screen_rows() == 37
    monkeypatch.setattr(output.shutil, "get_terminal_size", lambda: os.terminal_size((120, 5)))
    assert output.screen_rows() == 10


# -- search -----------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")


def expected(rows: list[dict[str, Any]], text: str, descriptions: dict[tuple[str, int], str | None]) -> list[str]:
    """The refs ``--search text`` should list, read from search.py's rules in plain Python."""
    wanted = [w.lower() for w in _WORD.findall(text)]
    found = []
    for row in rows:
        description = descriptions[row["name"], row["version"]] or ""
        fields = [row["name"], description, row["domain"] or "", row["style"] or ""]
        fields += [f"{key} {value}" for key, value in row["tags"].items()]
        words = _WORD.findall(" ".join(fields).lower())
        if all(any(word.startswith(w) for word in words) for w in wanted):
            found.append(f"{row['name']}@{row['version']}")
    return found


def _descriptions(registry: Registry) -> dict[tuple[str, int], str | None]:
    with registry.session() as session:
        rows = session.execute(select(Expert.name, Expert.version, Expert.description))
        return {(name, version): description for name, version, description in rows}


SEARCHES = [
    "gastro",  # a name's start
    "v2",  # a name's second word
    "polyps",  # a description word
    "café",  # a letter outside ASCII
    "caf",
    "oncology",  # a tag value
    "ward",  # a tag key (and a description word)
    "lead kim",
    "cardio",  # a domain's start
    "RIGOROUS",  # case
    "rigorous triage",  # every word
    "triage colon",  # no expert has both
    "release 3",
    "bulk p01",
    "dx_triage",
    "a-b",
    "a.b",
]
# text that is query syntax for FTS5 or to_tsquery: searched as the words it holds
HOSTILE = [
    '"gastro',
    'gastro"',
    "gastro*",
    "*gastro",
    "NEAR(misses errors)",
    "near misses",
    "misses AND",
    "AND",
    "OR triage",
    "NOT triage",
    "(triage",
    "triage)",
    "triage & !x",
    "triage | letters",
    "triage:*",
    "'triage'",
    "triage\\",
    "-triage",
    "^triage",
    "{name}: triage",
    "name:triage",
    "triage <-> notes",
]


@pytest.mark.parametrize("text", SEARCHES + HOSTILE)
def test_search_finds_what_the_rules_say(catalog: Registry, text: str) -> None:
    every = listed()
    found = refs(listed("--search", text))
    assert found == expected(every, text, _descriptions(catalog))
    if text in ("gastro", "polyps", "oncology", "ward", "cardio", "RIGOROUS", "café"):
        assert found, text  # the named rows are there to be found
    if text == "triage colon":
        assert found == []


def test_search_combines_with_filters_and_pages(catalog: Registry) -> None:
    assert refs(listed("--search", "triage", "--style", "rigorous")) == ["dx_triage@1"]
    assert refs(listed("--search", "triage", "--group", "style")) == []
    release = listed("--search", "release")
    assert len(release) == BULK
    page = ok("list", "--search", "release", "--limit", "10", "--offset", "10")
    assert table_refs(page.stdout) == refs(release)[10:20]
    assert f"Showing 11-20 of {BULK} experts" in page.stderr
    assert [e.ref for e in catalog.list_experts(search="release", group="domain")] == [
        r for r in refs(release) if int(r.split("@")[1]) == 2
    ]


def test_search_follows_removal_update_and_new_rows(catalog: Registry) -> None:
    assert refs(listed("--search", "polyps")) == ["gastro-v2@1"]
    assert catalog.remove_expert("gastro-v2@1") == ["gastro-v2@1"]
    assert listed("--search", "polyps") == []
    with catalog.write() as session:
        session.execute(text("UPDATE experts SET description = 'sessile polyps' WHERE name = 'letters'"))
    assert refs(listed("--search", "polyps")) == ["letters@1"]
    assert listed("--search", "discharge") == []  # its old words are gone
    with catalog.write() as session:
        group_id = session.scalar(select(Group.id).where(Group.name == "domain"))
        session.execute(insert(Expert), [_row({"domain": group_id}, "polyp-finder", 1, group="domain")])
    assert refs(listed("--search", "polyp")) == ["letters@1", "polyp-finder@1"]
    if catalog.engine.dialect.name == "sqlite":  # the FTS table holds one row per expert, no more
        with catalog.engine.connect() as connection:
            counts = connection.execute(
                text(f"SELECT (SELECT count(*) FROM experts), (SELECT count(*) FROM {search.SEARCH_TABLE})")
            ).one()
        assert counts[0] == counts[1]


def test_removing_through_the_command_line_removes_from_search(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "colon", seed=3)
    ok("add-expert", adapter, "--name", "colon", "--group", "domain", "--description", "polyps")
    assert refs(listed("--search", "polyp")) == ["colon@1"]
    ok("remove", "colon")
    assert listed("--search", "polyp") == []


@pytest.mark.skipif(not PG_ENABLED, reason="compares PostgreSQL with SQLite: run under ATMOE_TEST_PG=1")
def test_sqlite_and_postgresql_list_the_same(catalog: Registry, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'twin' / 'registry.db'}"
    with Registry.open(db_url=sqlite_url, store=tmp_path / "twin" / "store") as twin:
        fill(twin)
    twin_args = ("--db", sqlite_url, "--store", str(tmp_path / "twin" / "store"))

    def both(*args: str) -> tuple[Any, Any]:
        pg = ok("list", "--json", *args).stdout
        lite = ok(*twin_args, "list", "--json", *args).stdout
        strip = [{k: v for k, v in r.items() if k != "created_at"} for r in json.loads(pg)]
        return strip, [{k: v for k, v in r.items() if k != "created_at"} for r in json.loads(lite)]

    for args in (
        (),
        ("--limit", "9", "--offset", "40"),
        ("--domain", "cardiology"),
        ("--tag", "team=t2", "--group", "domain"),
        *(("--search", words) for words in SEARCHES + HOSTILE),
    ):
        pg, lite = both(*args)
        assert pg == lite, args


# -- the migration -------------------------------------------------------------------------------------


def _search_objects(engine: Any) -> set[str]:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            names = connection.execute(text("SELECT name FROM sqlite_master WHERE name LIKE 'experts_search%'"))
        else:
            names = connection.execute(
                text(
                    "SELECT indexname FROM pg_indexes WHERE indexname IN ('ix_experts_search', 'ix_experts_listing') "
                    "UNION SELECT proname FROM pg_proc WHERE proname = 'experts_search_document'"
                )
            )
        return set(names.scalars())


def test_upgrade_to_0004_indexes_the_catalog_and_downgrade_removes_it() -> None:
    engine = db.create_registry_engine(resolve().db_url)
    try:
        db.upgrade(engine, "0003")
        assert _search_objects(engine) == set()
        with Registry.open(check_schema=False) as registry:
            fill(registry, bulk=4)
        assert db.upgrade(engine, "0004") == ("0003", "0004")
        made = _search_objects(engine)
        if engine.dialect.name == "sqlite":
            assert {"experts_search", "experts_search_insert", "experts_search_delete"} <= made
        else:
            assert made == {"ix_experts_search", "ix_experts_listing", "experts_search_document"}
        db.upgrade(engine)
        assert refs(listed("--search", "polyps")) == ["gastro-v2@1"]  # backfilled
        assert refs(listed("--search", "release", "--limit", "2")) == ["bulk-p000@1", "bulk-p000@2"]
        assert db.downgrade(engine, "0003") == (db.HEAD, "0003")
        assert _search_objects(engine) == set()
        assert_one_line(invoke("list"), 1, "run atmoe-reg db upgrade")
        db.upgrade(engine)
        assert refs(listed("--search", "polyps")) == ["gastro-v2@1"]
    finally:
        engine.dispose()


# -- the reader: no SQLAlchemy on a healthy catalog --------------------------------------------------------


def test_list_of_a_healthy_catalog_imports_no_sqlalchemy(catalog: Registry) -> None:
    code = (
        "import sys\n"
        "from atmoe.cli import main\n"
        "for args in (['list'], ['list', '--json', '--limit', '3'], ['list', '--search', 'triage', '--all'],\n"
        "             ['list', '--json', '--tag', 'team=gi']):\n"
        "    assert main(args, standalone_mode=False) in (None, 0), args\n"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported'\n"
        "assert 'rich' not in sys.modules, 'rich imported for piped output'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert "dx_triage@1" in result.stdout


@pytest.fixture
def settings() -> Iterator[Any]:
    yield resolve()


def _opens(settings: Any) -> bool:
    opened = reader.open_reader(settings)
    if opened is None:
        return False
    with opened:
        assert listing.count(opened, listing.ExpertFilter()) >= 0
    return True


def test_reader_opens_only_what_registry_open_would_leave_alone(settings: Any) -> None:
    assert not _opens(settings)  # a new catalog: Registry.open creates it
    engine = db.create_registry_engine(settings.db_url)
    try:
        db.upgrade(engine, "0003")
        assert not _opens(settings)  # behind: Registry.open says to upgrade
        db.upgrade(engine)
        assert not _opens(settings)  # the store is not marked yet: Registry.open marks it
        Registry.open().close()
        assert _opens(settings)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        assert not _opens(settings)  # unknown: Registry.open refuses it
        assert_one_line(invoke("list"), 1, "'9999' is unknown to this atmoe-reg")
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "postgresql+psycopg://user:p%40ss%3Aword@db.example.org/cat%2Falog",
        "postgresql+psycopg://u@[::1]:6543/x?sslmode=require&connect_timeout=5",
        "postgresql+psycopg:///atmoe?host=/var/run/postgresql",
        "postgresql+psycopg://",
        "postgresql+psycopg://u:@h/d",
    ],
)
def test_postgresql_urls_are_read_as_sqlalchemy_reads_them(url: str) -> None:
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.engine import make_url

    args, kwargs = PGDialect_psycopg().create_connect_args(make_url(url))
    assert args in ([], [""])
    assert reader.psycopg_connect_args(url) == kwargs


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/d",  # psycopg2, SQLAlchemy's default driver
        "postgresql+psycopg2://u@h/d",
        "postgresql+psycopg://h/d?host=a&host=b",  # several hosts
        "postgresql+psycopg://u@h:notaport/d",
        "mysql://u@h/d",
    ],
)
def test_other_urls_are_left_to_sqlalchemy(url: str) -> None:
    assert reader.psycopg_connect_args(url) is None


@pytest.mark.parametrize(
    ("url", "file"),
    [
        ("sqlite:////abs/registry.db", "/abs/registry.db"),
        ("sqlite:///rel/registry.db", "rel/registry.db"),
        ("sqlite+pysqlite:////abs/with%20space.db", "/abs/with space.db"),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:x.db?mode=ro&uri=true", None),
        ("sqlite:////abs/registry.db?timeout=5", None),
    ],
)
def test_sqlite_urls_are_read_as_sqlalchemy_reads_them(url: str, file: str | None) -> None:
    found = reader.sqlite_file(url)
    assert (str(found) if found else None) == file
    if file is not None:
        assert db.sqlite_path(url) == found


def test_a_database_that_cannot_be_read_is_one_line_as_for_any_command(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    refused = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    for url in (f"sqlite:///{junk}", refused):
        messages = {
            assert_one_line(invoke("--db", url, command), 1, "database error: ") for command in ("list", "groups")
        }
        assert len(messages) == 1, messages  # list says what every other command says
