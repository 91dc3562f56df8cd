"""A small T5 tokenizer generated locally, so the built-in SD3 and Flux models need no download.

T5's layout in miniature: a SentencePiece-style unigram model (`▁` marks a word start) whose
pieces are the caption words, single letters and digits, with T5's special ids (pad 0, eos 1,
unk 2) and an end-of-sequence token after every text, as the real tokenizer adds.
"""

from __future__ import annotations

import string
from pathlib import Path

from difftrain.models.tokenizer import CAPTION_WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def build_t5_tokenizer(max_length: int = 32):
    """A `T5TokenizerFast` (transformers' tokenizers-backed T5 tokenizer) built in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    pieces += [(f"▁{word}", -1.0) for word in CAPTION_WORDS]
    # Single characters spell any other word, so no caption is ever all <unk>.
    pieces += [(char, -5.0) for char in "▁" + string.ascii_lowercase + string.digits]
    pieces += [(char, -6.0) for char in string.ascii_uppercase + string.punctuation]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_ids=0,
        model_max_length=max_length,
    )


def save_t5_tokenizer(folder: Path, max_length: int = 32) -> None:
    build_t5_tokenizer(max_length).save_pretrained(str(folder))
