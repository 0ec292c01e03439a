"""Item-metadata cleaning in DuckDB (the rules of the window stage).

The rules, in the order they are applied to one metadata line:

1. `malformed`: the line is not a JSON object with a non-empty string `parent_asin`
   (counted per file by `rrec.data.window`, not as an item drop).
2. `missing_title`: `title` is absent, null or not a JSON string.
3. `span_title`: the HTML-unescaped title contains `<span id` (scraping debris).
4. The title is cleaned as the authors clean it: HTML-unescape, drop tags, remove every
   `"` and `'`, control characters (newlines, tabs, ...) and non-ASCII characters to
   spaces, collapse runs of spaces, strip. This form decides rules 5 and 6 only.
5. `short_title`: the cleaned title has at most one character.
6. `long_title`: the title has more than `max_title_words` words, counted in the
   protocol's order: on the unescaped title without tags and quotes, *before* non-ASCII characters
   become spaces (that is text cleaning, for the prompt). A word is a run of characters
   that are neither Unicode separators (spaces, no-break spaces, ...) nor control
   characters, so "Doragon b\u00f4ru GT" is three words, as a reader counts them.
7. `bad_price`: `price` is neither a JSON number nor a string that parses as a number
   (surrounding whitespace allowed); NaN, infinities and negative prices are bad too.
   Junk such as "None", "from $12.99", "—" or null is bad.
8. `duplicate_meta`: a line that passes 2-7 but whose `parent_asin` already had an
   earlier (in file order) line that passed them; the first valid line wins.

The title an item keeps (for prompts and serving) is the text of the unescaped title,
tags dropped, with accents folded instead of lost: Unicode NFKD, combining marks dropped
("Édition Spéciale" becomes "Edition Speciale", "™" "TM"), then what is still not
printable ASCII to spaces, spaces collapsed; `"` is removed, and `'` too unless it is an
apostrophe between letters or digits ("Hero&#39;s" becomes "Hero's").
Which items are kept is decided by the authors' form above, so the window is theirs.

An item's other text fields (description[] and features[] joined with spaces,
categories[] joined with " > ", store, main_category) go through the same text
cleaning as the title minus the quote removal: HTML-unescape (Python's `html.unescape`,
which knows every HTML5 named entity and numeric `&#NNN;` / `&#xHH;` references), drop
tags (`<...>` starting with a letter, `/` or `!`, each replaced by a space), fold accents
as in the title, control and remaining non-ASCII characters to spaces, collapse spaces,
strip. List elements are cleaned one by
one and empty ones dropped before joining. Unescaping comes first so that escaped markup
(`&lt;br&gt;`) is dropped like real markup.

The other metadata fields are read as JSON and typed by the `rrec_meta_*` macros (for
the items kept only, when the items are written): description, features and categories
must be arrays of strings, store and main_category strings, average_rating a finite
number and rating_number a whole number >= 0. A field of another type is read as
missing and counted (`wrong_type`, per field, see `TYPED_FIELDS`); in an array, elements
that are not strings are left out and the field counted. JSON null and an absent field
are missing, not wrong. A NUL character (the valid JSON escape `\u0000`) is removed from
ids and, like any control character, read as a space in the title and text; the items
written with one are counted (`nul_characters`).

DuckDB has no HTML unescape of its own (the `inet` extension's needs a download), so
`rrec_unescape` is a Python UDF (`html.unescape` itself); only strings that contain `&`
reach Python.
"""

from __future__ import annotations

import html
import unicodedata

import duckdb

# Drop reasons of one metadata line, in the order they are checked.
ITEM_REASONS: tuple[str, ...] = (
    "missing_title",
    "span_title",
    "short_title",
    "long_title",
    "bad_price",
    "duplicate_meta",
)

# The metadata fields typed by macros, and their kind: list (array of strings), text
# (string), number (finite), count (whole number >= 0).
TYPED_FIELDS: dict[str, str] = {
    "description": "list",
    "features": "list",
    "categories": "list",
    "store": "text",
    "main_category": "text",
    "average_rating": "number",
    "rating_number": "count",
}

_TAG = r"</?[A-Za-z!][^<>]*>"
_NOT_PRINTABLE_ASCII = r"[^\x20-\x7E]"
_WORD = r"[^\pZ\p{Cc}]+"


def fold(text: str) -> str:
    """Accents folded: NFKD, combining marks dropped ("é" -> "e", "ﬁ" -> "fi")."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Define `rrec_unescape` and the cleaning macros (`rrec_clean_text(s)`,
    `rrec_clean_title(s)`, `rrec_clean_list(list, sep)`, ...) on `con`."""
    # One Python call per string, NULL stays NULL; the guards keep strings without `&` out.
    con.create_function("rrec_unescape", html.unescape, ["VARCHAR"], "VARCHAR", side_effects=False)
    con.create_function("rrec_fold", fold, ["VARCHAR"], "VARCHAR", side_effects=False)
    # The guards: most strings need no change, and a test that fails is one cheap scan.
    macros = {
        "rrec_unescape_if(s)": "CASE WHEN contains(s, '&') THEN rrec_unescape(s) ELSE s END",
        # only strings with a non-ASCII character reach Python
        "rrec_fold_if(s)": "CASE WHEN strlen(s) <> length(s) THEN rrec_fold(s) ELSE s END",
        "rrec_drop_tags(s)": (
            f"CASE WHEN contains(s, '<') THEN regexp_replace(s, '{_TAG}', ' ', 'g') ELSE s END"
        ),
        # Cheaper than a regular expression, and true whenever one would match
        # `[^\x20-\x7E]|  |^ | $`: non-ASCII makes the byte length exceed the character
        # count, and JSON escapes every control character (and `"` and `\`, false alarms).
        "rrec_needs_squash(s)": (
            "strlen(s) <> length(s) OR strlen(to_json(s)) <> strlen(s) + 2 "
            "OR contains(s, chr(127)) OR contains(s, '  ') OR starts_with(s, ' ') "
            "OR ends_with(s, ' ')"
        ),
        "rrec_squash(s)": (
            "CASE WHEN rrec_needs_squash(s) THEN trim(regexp_replace(regexp_replace("
            f"s, '{_NOT_PRINTABLE_ASCII}', ' ', 'g'), ' {{2,}}', "
            "' ', 'g')) ELSE s END"
        ),
        # An id without NUL characters (a valid JSON escape, never part of an id).
        "rrec_strip_nul(s)": "CASE WHEN contains(s, chr(0)) THEN replace(s, chr(0), '') ELSE s END",
        # Typed metadata fields from JSON: the value, or NULL when of another type.
        "rrec_meta_list(j)": (
            "CASE WHEN json_type(j) = 'ARRAY' THEN list_transform(list_filter("
            "json_extract(j, '$[*]'), lambda x: json_type(x) = 'VARCHAR'), "
            "lambda x: json_extract_string(x, '$')) END"
        ),
        "rrec_meta_text(j)": "CASE WHEN json_type(j) = 'VARCHAR' THEN json_extract_string(j, '$') END",
        # Whether a typed text or list field holds a NUL character (read as a space).
        "rrec_text_has_nul(j)": "coalesce(contains(rrec_meta_text(j), chr(0)), false)",
        "rrec_list_has_nul(j)": (
            "coalesce(list_bool_or(list_transform(rrec_meta_list(j), "
            "lambda x: contains(x, chr(0)))), false)"
        ),
        "rrec_meta_number(j)": (
            "CASE WHEN json_type(j) IN ('BIGINT', 'UBIGINT', 'HUGEINT', 'DOUBLE') AND "
            "isfinite(TRY_CAST(j AS DOUBLE)) THEN TRY_CAST(j AS DOUBLE) END"
        ),
        "rrec_meta_count(j)": (
            "CASE WHEN json_type(j) IN ('BIGINT', 'UBIGINT', 'HUGEINT', 'DOUBLE') AND "
            "TRY_CAST(j AS DOUBLE) >= 0 AND TRY_CAST(j AS DOUBLE) = TRY_CAST(j AS BIGINT) "
            "THEN TRY_CAST(j AS BIGINT) END"
        ),
        # Whether a present, non-null field is of the wrong type: a scalar whose typed
        # value is NULL, or not an array of strings (null elements allowed).
        "rrec_meta_wrong(j, value)": "coalesce(json_type(j) <> 'NULL' AND value IS NULL, false)",
        "rrec_meta_list_wrong(j)": (
            "coalesce(json_type(j) NOT IN ('NULL', 'ARRAY') OR (json_type(j) = 'ARRAY' AND NOT "
            "list_bool_and(list_transform(json_type(j, '$[*]'), "
            "lambda t: t IN ('VARCHAR', 'NULL')))), false)"
        ),
        "rrec_clean_text(s)": "coalesce(rrec_squash(rrec_fold_if(rrec_drop_tags(rrec_unescape_if(s)))), '')",
        # The title an item keeps, of the unescaped title: the text without double quotes,
        # and without single quotes but apostrophes (between letters or digits), accents folded.
        "rrec_text_title(s)": (
            "rrec_squash(regexp_replace(regexp_replace(rrec_fold_if(replace(rrec_drop_tags(s), '\"', '')), "
            "'(^|[^[:alnum:]])''+', '\\1', 'g'), '''+([^[:alnum:]]|$)', '\\1', 'g'))"
        ),
        # Takes the already unescaped title (the span check needs that one too).
        "rrec_strip_title(s)": "replace(replace(rrec_drop_tags(s), '\"', ''), '''', '')",
        "rrec_clean_unescaped_title(s)": "rrec_squash(rrec_strip_title(s))",
        "rrec_clean_title(s)": "rrec_clean_unescaped_title(rrec_unescape_if(s))",
        # Joined with spaces, empty elements vanish when the spaces collapse; with another
        # separator they are dropped one by one. There, rrec_clean_text runs one step per
        # lambda: a macro repeats its argument expression wherever it uses it, and DuckDB
        # does not share those repeats inside a lambda.
        "rrec_clean_list(xs, sep)": (
            "coalesce(CASE WHEN sep = ' ' THEN rrec_clean_text(array_to_string(xs, ' ')) "
            "ELSE array_to_string(list_filter(list_transform(list_transform(list_transform("
            "xs, lambda x: rrec_unescape_if(x)), lambda x: rrec_drop_tags(x)), "
            "lambda x: coalesce(rrec_squash(rrec_fold_if(x)), '')), lambda x: x <> ''), sep) END, '')"
        ),
        # Of a squashed string (single spaces, no control or non-ASCII characters).
        "rrec_word_count(s)": (
            "CASE WHEN s = '' THEN 0 ELSE length(s) - length(replace(s, ' ', '')) + 1 END"
        ),
        # Of any string: runs of characters that are neither separators nor controls. The
        # cheap count of the squashed form is the same whenever `s` is pure ASCII.
        "rrec_title_words(s, squashed)": (
            "CASE WHEN strlen(s) = length(s) THEN rrec_word_count(squashed) "
            f"ELSE len(regexp_extract_all(s, '{_WORD}')) END"
        ),
    }
    for head, body in macros.items():
        con.execute(f"CREATE OR REPLACE MACRO {head} AS {body}")


def item_validity_sql(source: str, max_title_words: int) -> str:
    """A query over `source` (columns parent_asin, title JSON, price JSON and any others,
    which pass through in order) that replaces `title` by the title's text (accents folded)
    and `price` by
    a DOUBLE or NULL, and adds `title_has_nul` (the title held a NUL character) and
    `reason`: NULL when the line is valid, else one of
    ITEM_REASONS except duplicate_meta, which needs the file order and is decided by the
    caller. Every line is returned, malformed ones too: the caller counts those apart."""
    return f"""
        WITH typed AS (
            SELECT *,
                CASE WHEN json_type(title) = 'VARCHAR'
                     THEN rrec_unescape_if(json_extract_string(title, '$')) END AS title_unescaped,
                CASE
                    WHEN json_type(price) = 'VARCHAR'
                        THEN TRY_CAST(trim(json_extract_string(price, '$')) AS DOUBLE)
                    WHEN json_type(price) IN ('BIGINT', 'UBIGINT', 'HUGEINT', 'DOUBLE')
                        THEN TRY_CAST(price AS DOUBLE)
                END AS price_value
            FROM {source}
        ), stripped AS (
            SELECT *, rrec_strip_title(title_unescaped) AS title_stripped FROM typed
        ), cleaned AS (
            SELECT *, rrec_squash(title_stripped) AS title_clean FROM stripped
        )
        SELECT * EXCLUDE (title_unescaped, title_stripped, title_clean, price_value)
                REPLACE (rrec_text_title(title_unescaped) AS title, price_value AS price),
            coalesce(contains(title_unescaped, chr(0)), false) AS title_has_nul,
            CASE
                WHEN title_unescaped IS NULL THEN 'missing_title'
                WHEN contains(title_unescaped, '<span id') THEN 'span_title'
                WHEN length(title_clean) <= 1 THEN 'short_title'
                WHEN rrec_title_words(title_stripped, title_clean) > {int(max_title_words)}
                    THEN 'long_title'
                WHEN price_value IS NULL OR NOT isfinite(price_value) OR price_value < 0
                    THEN 'bad_price'
            END AS reason
        FROM cleaned
    """
