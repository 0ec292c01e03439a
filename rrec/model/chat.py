"""Chat conversations to token ids, with control tokens in message text encoded as text.

`transformers` does this with `apply_chat_template(..., sanitize_control_tokens=True)`:
it wraps every control token found in the message text in private-use markers,
renders the template, splits each rendered chat at the markers and encodes the pieces
one by one, the marked ones as plain text. That is four to six `encode` calls per chat
(every prompt here mentions `<answer>` and `</answer>` in its instruction), so it
cost about a third of encoding the whole item table.

`chat_ids` takes the same steps with the library's own marking, rendering and piece
rules, but for a whole batch at once: the pieces shared by many chats (the template's
head, the instruction around `<answer>`) are encoded once, and the rest in one
batched call of the Rust tokenizer. `tests/test_chat.py` checks that the ids are
exactly the library's, control tokens in titles included. Should the library's
internals move, `chat_ids` falls back to the library's per-chat path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

Message = Mapping[str, str]

try:  # the library's own marking and rendering, so both paths agree by construction
    from transformers.utils.chat_template_utils import (
        _encode_chat_piece,
        _get_control_token_patterns,
        mark_control_tokens,
        render_jinja_template,
    )
except ImportError:  # pragma: no cover - only with a transformers that moved them
    _encode_chat_piece = None


def library_chat_ids(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> list[list[int]]:
    """The library's per-chat path: the reference `chat_ids` must equal."""
    ids = tokenizer.apply_chat_template(
        [list(c) for c in conversations],
        add_generation_prompt=True,
        tokenize=True,
        sanitize_control_tokens=True,
        return_dict=False,
    )
    return [list(x) for x in ids]


def _batched_chat_ids(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> list[list[int]]:
    template = tokenizer.get_chat_template()
    control_re, markers_re = _get_control_token_patterns(tokenizer._get_control_tokens(template))
    marked = [mark_control_tokens(list(c), control_re) for c in conversations]
    rendered, _ = render_jinja_template(
        conversations=marked,
        chat_template=template,
        add_generation_prompt=True,
        **tokenizer.special_tokens_map,
    )
    # [text, marked token, text, ...]; None in a token slot for a lone marker
    split = [markers_re.split(chat) for chat in rendered]

    # distinct pieces in order of first appearance (so errors come in the library's order)
    first = list(dict.fromkeys(pieces[0] for pieces in split))
    middle = list(dict.fromkeys(p for pieces in split for p in pieces[2::2] if p))
    as_text = dict.fromkeys(p for pieces in split for p in pieces[1::2] if p)

    def encode_all(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    first_ids = dict(zip(first, encode_all(first), strict=True))
    # the library encodes a middle piece after a newline and strips it (for
    # SentencePiece's prefix space), or alone when the newline does not survive
    newline = tokenizer.encode("\n", add_special_tokens=False)
    middle_ids: dict[str, list[int]] = {}
    for piece, ids in zip(middle, encode_all(["\n" + p for p in middle]), strict=True):
        if ids[: len(newline)] == newline:
            middle_ids[piece] = ids[len(newline) :]
        else:
            middle_ids[piece] = tokenizer.encode(piece, add_special_tokens=False)
    text_ids = {}
    for piece in as_text:  # a handful of distinct control tokens
        ids = _encode_chat_piece(tokenizer, piece, True, newline)
        if tokenizer.convert_tokens_to_ids(piece) in ids:
            raise ValueError(f"Can't sanitize {piece!r}: the tokenizer produces it from plain text")
        text_ids[piece] = ids

    out = []
    for pieces in split:
        ids = list(first_ids[pieces[0]])
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += text_ids[piece] if i % 2 == 1 else middle_ids[piece]
        out.append(ids)
    return out


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> list[list[int]]:
    """Token ids of chat conversations with the generation prompt (assistant turn opened).

    Control tokens written inside message text (an instruction that mentions
    `<answer>`, a title that contains `<|im_end|>`) are encoded as ordinary text:
    only the template and the code that appends `<answer>` can produce control-token
    ids. Exactly `apply_chat_template(..., sanitize_control_tokens=True)`'s ids,
    computed for the whole batch at once (see the module docstring).
    """
    if not conversations:
        return []
    batched = (
        len(conversations) > 1  # for one chat the library's path is as fast
        and _encode_chat_piece is not None
        and getattr(tokenizer, "is_fast", False)
        and getattr(tokenizer, "chat_template", None) is not None
        and hasattr(tokenizer, "_get_control_tokens")
    )
    if not batched:
        return library_chat_ids(tokenizer, conversations)
    return _batched_chat_ids(tokenizer, conversations)
