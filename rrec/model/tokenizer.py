"""The tiny backbone's tokenizer: byte-level BPE trained on the catalogue's prompts.

It is built to be a drop-in Qwen2 tokenizer: the same normaliser (NFC), the same
pre-tokenisation regex followed by byte-level mapping, and the same byte-level
decoder as `transformers`' `Qwen2Tokenizer`. That matters because `AutoTokenizer`
loads any directory whose config says `model_type: qwen2` through `Qwen2Tokenizer`,
which rebuilds the pipeline from the saved vocabulary and merges; with identical
settings the reloaded tokenizer encodes exactly as the trained one.

Chat template (Qwen style, no default system turn)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (per message)
    <|im_start|>assistant\\n                       (add_generation_prompt)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ANSWER = "<answer>"
END_ANSWER = "</answer>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS, IM_START, IM_END, ANSWER, END_ANSWER)
CONTROL_TOKENS: tuple[str, ...] = (ANSWER, END_ANSWER)

# The pre-tokenisation regex of Qwen2's tokenizer (see the module docstring for why it
# has to be the same one).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = Mapping[str, str]


def template_text_segments(conversations: Iterable[Sequence[Message]]) -> Iterator[str]:
    """The plain-text pieces the chat template writes between its special tokens.

    Training the BPE on these (rather than on the rendered string) keeps the
    template's special tokens out of the merge statistics; the pieces are exactly
    what the tokenizer later sees between them.
    """
    for messages in conversations:
        for message in messages:
            yield f"{message['role']}\n{message['content']}"
            yield "\n"
        yield "assistant\n"


def _backend(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte is in the vocabulary, so no text is ever out of vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer(
    conversations: Sequence[Sequence[Message]], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on chat conversations and wrap it as a HF fast tokenizer.

    Deterministic: the same conversations give the same vocabulary and merges.
    `vocab_size` counts the 256 byte symbols and the special tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(
            f"model.tiny.vocab_size must exceed {minimum} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size}"
        )
    if not conversations:
        raise ValueError("no conversations to train the tokenizer on (the prompt files are empty)")
    backend, trainer = _backend(vocab_size)
    backend.train_from_iterator(
        template_text_segments(conversations), trainer, length=3 * len(conversations)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=[IM_START, IM_END, ANSWER, END_ANSWER],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
    )
    return tokenizer


def control_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The single id of a control token, or a clear error if the tokenizer lacks it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no single-id token {token!r} (it encodes to {ids}); load the "
            "backbone through rrec.model.load_model_and_tokenizer, which adds the control tokens"
        )
    return int(ids[0])
