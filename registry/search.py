"""Full-text search of the catalog (``list --search TEXT``): what is indexed, and how a user's text
becomes a query that each engine runs literally.

What is indexed, per expert version: its name, description, domain, style, and every tag key and
value. Words are the runs of letters and digits; anything else separates them, so ``gastro-v2``
holds the words ``gastro`` and ``v2``. A search finds the experts holding, for every word of the
text, a word that starts with it (``gastro`` finds ``gastroenterology``), case-insensitively.

The index lives beside the tables that ``models.py`` declares, made by migration 0004 for each
engine (so Alembic's model comparison skips it, ``is_search_object``):

- SQLite: the FTS5 table ``experts_search`` (rowid = ``experts.id``, unicode61 words, diacritics
  kept), filled by triggers on every insert, update and delete of ``experts``.
- PostgreSQL: a GIN index on ``to_tsvector('simple', experts_search_document(...))``, the SQL
  function that joins the same fields with punctuation turned into spaces.

A user's text never reaches either query parser as syntax: it is cut into its words here, and only
those words (letters and digits) are quoted into the engine's query (``"w"*`` for FTS5, ``w:*``
for ``to_tsquery``). Quotes, ``*``, ``NEAR``, ``AND``, parentheses... are searched as the words
they contain, or, when the text has no word at all, refused in one line.

Letters outside ASCII: SQLite splits words by Unicode classes; PostgreSQL by its database locale,
which can differ for punctuation outside ASCII (an em dash may join two words there).
"""

from __future__ import annotations

import re

from atmoe.errors import UsageError

SEARCH_TABLE = "experts_search"  # SQLite FTS5 (and its shadow tables experts_search_*)
SEARCH_INDEX = "ix_experts_search"  # PostgreSQL GIN index
SEARCH_FUNCTION = "experts_search_document"  # PostgreSQL: the indexed text of one expert row
LISTING_INDEX = "ix_experts_listing"  # PostgreSQL: (name COLLATE "C", version), the listing order
MAX_WORDS = 32

_WORD = re.compile(r"[^\W_]+")  # letters and digits (Unicode), as FTS5's unicode61 reads words


def is_search_object(name: str | None) -> bool:
    """Is this table or index part of the search index (made by migration 0004, not by models.py)?"""
    return name is not None and (
        name == SEARCH_TABLE or name.startswith(SEARCH_TABLE + "_") or name in (SEARCH_INDEX, LISTING_INDEX)
    )


def alembic_include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name``: compare every table and index with models.py but the search's."""
    return not (type_ in ("table", "index") and is_search_object(name))


def search_words(text: str) -> list[str]:
    """The words of a user's search text; UsageError when it has none or too many."""
    words = _WORD.findall(text)
    if not words:
        raise UsageError(f"--search {text!r} has no letter or digit to search for")
    if len(words) > MAX_WORDS:
        raise UsageError(f"--search has {len(words)} words; give at most {MAX_WORDS}")
    return words


def fts5_query(words: list[str]) -> str:
    """``["gastro", "v2"]`` -> ``"gastro"* "v2"*`` (FTS5: every word, as a quoted prefix)."""
    return " ".join(f'"{word}"*' for word in words)


def tsquery(words: list[str]) -> str:
    """``["gastro", "v2"]`` -> ``gastro:* & v2:*`` (to_tsquery: every word, as a prefix)."""
    return " & ".join(f"{word}:*" for word in words)
