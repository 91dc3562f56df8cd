"""A small CLIP tokenizer generated locally, so the built-in models need no download.

The vocabulary is CLIP's layout in miniature: the 256 byte-level symbols, the same with the
end-of-word marker `</w>`, one merged token per prefix of a list of caption words, and the two
special tokens. Unknown words still tokenise (byte by byte), exactly as real CLIP does.
"""

from __future__ import annotations

import json
from pathlib import Path

# Words the dummy data and typical prompts use; each becomes a single token.
CAPTION_WORDS = (
    "a an the of on in with and photo picture image drawing painting render small large big tiny "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle rectangle ellipse cross star stripe stripes dot dots shape shapes "
    "background foreground left right top bottom center middle corner bright dark light "
    "cat dog house tree car person face flower sky sea mountain city street portrait style"
).split()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def build_clip_vocab(words: tuple[str, ...] = CAPTION_WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) for a byte-level BPE that spells each of `words` as one token."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Spell the word with the merges so far, then join its pieces left to right. The new
        # merges rank after all earlier ones, so earlier words keep their single tokens.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            ranks[(merged, piece)] = len(ranks)
            merged += piece
            tokens.append(merged)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(symbols) > 1:
        adjacent = zip(symbols, symbols[1:], strict=False)
        pairs = [(ranks[pair], i) for i, pair in enumerate(adjacent) if pair in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def write_clip_vocab_files(folder: Path) -> None:
    """CLIP's own vocab.json + merges.txt (what older, pure-Python tokenizers read)."""
    vocab, merges = build_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def save_clip_tokenizer(folder: Path, max_length: int = 77) -> None:
    """Write the tokenizer into `folder` in the layout `CLIPTokenizer.from_pretrained` reads.

    We write CLIP's own file format (vocab.json + merges.txt) and let transformers load and
    re-save it, so the folder suits whichever transformers version reads it later.
    """
    from transformers import CLIPTokenizer

    write_clip_vocab_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(str(folder))
