"""Item-metadata cleaning in DuckDB (SPEC section 1).

The rules, in the order they are applied to one metadata line:

1. `malformed`: the line is not a JSON object with a non-empty string `parent_asin`
   (counted per file by `rrec.data.window`, not as an item drop).
2. `missing_title`: `title` is absent, null or not a JSON string.
3. `span_title`: the HTML-unescaped title contains `<span id` (scraping debris).
4. The title is cleaned: HTML-unescape, drop tags, remove every `"` and `'`, control
   characters (newlines, tabs, ...) and non-ASCII characters to spaces, collapse runs of
   spaces, strip.
5. `short_title`: the cleaned title has at most one character.
6. `long_title`: the cleaned title has more than `max_title_words` words.
7. `bad_price`: `price` is neither a JSON number nor a string that parses as a number
   (surrounding whitespace allowed); NaN, infinities and negative prices are bad too.
   Junk such as "None", "from $12.99", "—" or null is bad.
8. `duplicate_meta`: a line that passes 2-7 but whose `parent_asin` already had an
   earlier (in file order) line that passed them; the first valid line wins.

An item's other text fields (description[] and features[] joined with spaces,
categories[] joined with " > ", store, main_category) go through the same text
cleaning as the title minus the quote removal: HTML-unescape (Python's `html.unescape`,
which knows every HTML5 named entity and numeric `&#NNN;` / `&#xHH;` references), drop
tags (`<...>` starting with a letter, `/` or `!`, each replaced by a space), control and
non-ASCII characters to spaces, collapse spaces, strip. List elements are cleaned one by
one and empty ones dropped before joining. Unescaping comes first so that escaped markup
(`&lt;br&gt;`) is dropped like real markup.

DuckDB has no HTML unescape of its own (the `inet` extension's needs a download), so
`rrec_unescape` is a vectorised Python UDF; only strings that contain `&` reach Python.
"""

from __future__ import annotations

import html

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

# Drop reasons of one metadata line, in the order they are checked.
ITEM_REASONS: tuple[str, ...] = (
    "missing_title",
    "span_title",
    "short_title",
    "long_title",
    "bad_price",
    "duplicate_meta",
)

_TAG = r"</?[A-Za-z!][^<>]*>"
_NOT_PRINTABLE_ASCII = r"[^\x20-\x7E]"


def _unescape_arrow(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`html.unescape` over a string array; strings without `&` never enter Python."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    mask = pc.fill_null(pc.match_substring(values, "&"), False)
    if not pc.any(mask).as_py():
        return values
    fixed = [html.unescape(v) for v in pc.filter(values, mask).to_pylist()]
    return pc.replace_with_mask(values, mask, pa.array(fixed, values.type))


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Define `rrec_unescape` and the cleaning macros (`rrec_clean_text(s)`,
    `rrec_clean_title(s)`, `rrec_clean_list(list, sep)`, ...) on `con`."""
    con.create_function(
        "rrec_unescape", _unescape_arrow, ["VARCHAR"], "VARCHAR", type="arrow", side_effects=False
    )
    # The guards: most strings need no change, and a test that fails is one cheap scan.
    macros = {
        "rrec_unescape_if(s)": "CASE WHEN contains(s, '&') THEN rrec_unescape(s) ELSE s END",
        "rrec_drop_tags(s)": (
            f"CASE WHEN contains(s, '<') THEN regexp_replace(s, '{_TAG}', ' ', 'g') ELSE s END"
        ),
        "rrec_squash(s)": (
            f"CASE WHEN regexp_matches(s, '{_NOT_PRINTABLE_ASCII}|  |^ | $') THEN trim("
            f"regexp_replace(regexp_replace(s, '{_NOT_PRINTABLE_ASCII}', ' ', 'g'), ' {{2,}}', "
            "' ', 'g')) ELSE s END"
        ),
        "rrec_clean_text(s)": "coalesce(rrec_squash(rrec_drop_tags(rrec_unescape_if(s))), '')",
        # Takes the already unescaped title (the span check needs that one too).
        "rrec_clean_unescaped_title(s)": (
            "rrec_squash(replace(replace(rrec_drop_tags(s), '\"', ''), '''', ''))"
        ),
        "rrec_clean_title(s)": "rrec_clean_unescaped_title(rrec_unescape_if(s))",
        # Joined with spaces, empty elements vanish when the spaces collapse; with another
        # separator they are dropped one by one.
        "rrec_clean_list(xs, sep)": (
            "coalesce(CASE WHEN sep = ' ' THEN rrec_clean_text(array_to_string(xs, ' ')) "
            "ELSE array_to_string(list_filter(list_transform(xs, lambda x: rrec_clean_text(x)), "
            "lambda x: x <> ''), sep) END, '')"
        ),
        "rrec_word_count(s)": (
            "CASE WHEN s = '' THEN 0 ELSE length(s) - length(replace(s, ' ', '')) + 1 END"
        ),
    }
    for head, body in macros.items():
        con.execute(f"CREATE OR REPLACE MACRO {head} AS {body}")


def item_validity_sql(source: str, max_title_words: int) -> str:
    """A query over `source` (columns line_no, parent_asin, title JSON, price JSON, ...)
    returning every line with a non-empty parent_asin, its cleaned `title`, its `price`
    (DOUBLE or NULL) and `reason` (NULL when valid, else one of ITEM_REASONS except
    duplicate_meta, which needs the file order and is decided by the caller)."""
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
            WHERE parent_asin IS NOT NULL AND parent_asin <> ''
        ), cleaned AS (
            SELECT *, rrec_clean_unescaped_title(title_unescaped) AS title_clean FROM typed
        )
        SELECT * EXCLUDE (title, price, title_unescaped, title_clean, price_value),
            title_clean AS title,
            price_value AS price,
            CASE
                WHEN title_unescaped IS NULL THEN 'missing_title'
                WHEN contains(title_unescaped, '<span id') THEN 'span_title'
                WHEN length(title_clean) <= 1 THEN 'short_title'
                WHEN rrec_word_count(title_clean) > {int(max_title_words)} THEN 'long_title'
                WHEN price_value IS NULL OR NOT isfinite(price_value) OR price_value < 0
                    THEN 'bad_price'
            END AS reason
        FROM cleaned
    """
