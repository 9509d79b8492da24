"""Prompts: the encoder reads the first 77 tokens of any text, at a cost bounded by those."""

from __future__ import annotations

import pytest
import torch

from syncdiffusion.pipeline import encoder_text

TEXTS = {
    "short": "a lighthouse on a cliff",
    "long_words": "a lighthouse on a cliff, " * 400,
    "no_whitespace": "悬崖上的灯塔" * 1500,
    "mostly_whitespace": "a" + " " * 5000 + "b c " * 500,
    "one_long_word": "x" * 9000,
}


def _whole_text_embedding(pipe, text: str) -> torch.Tensor:
    """The embedding as the published code computes it: the whole text tokenized, then cut."""
    ids = pipe.tokenizer(
        text,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_the_encoder_reads_what_it_read_from_the_whole_text(pipe, text):
    assert torch.equal(pipe.encode_prompt(text)[1:], _whole_text_embedding(pipe, text))


class _Recording:
    """The tokenizer, noting the length of every text it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, text: str, **options):
        self.lengths.append(len(text))
        return self.tokenizer(text, **options)


def test_a_huge_prompt_costs_no_more_than_a_long_one(pipe):
    tokenizer = _Recording(pipe.tokenizer)
    read, n_tokens = encoder_text(tokenizer, "悬崖上的灯塔" * 400_000)  # 2.4 M characters
    assert n_tokens is None  # more than the encoder reads
    assert len(read) < 1000 and max(tokenizer.lengths) < 1000
    short = "a lighthouse"
    assert encoder_text(tokenizer, short) == (short, len(pipe.tokenizer(short).input_ids))
