"""Data sets for the experiments: Penn Treebank, sentence-level batches (DESIGN.md §5)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class DataMissing(FileNotFoundError):
    """A data file the experiment needs is not where it was looked for."""


@dataclass
class Corpus:
    vocab: list[str]
    train: list[list[int]]
    valid: list[list[int]]
    test: list[list[int]]

    @property
    def pad(self) -> int:
        return 0


def _read_lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DataMissing(
            f"{path} not found: PTB is expected as ptb.train.txt / ptb.valid.txt / ptb.test.txt in "
            f"{path.parent}; pass --data with the folder holding ptb/ (default {DEFAULT_ROOT})"
        )
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def load_ptb(root: str | Path = DEFAULT_ROOT, max_len: int = 64) -> Corpus:
    """PTB as sentences ``<bos> w1 … wn <eos>`` cut at ``max_len`` tokens, as ids."""
    folder = Path(root) / "ptb"
    splits = {name: _read_lines(folder / f"ptb.{name}.txt") for name in ("train", "valid", "test")}
    words = sorted({w for line in splits["train"] for w in line})
    vocab = [PAD, BOS, EOS, *words]
    index = {w: i for i, w in enumerate(vocab)}
    unk = index["<unk>"]

    def encode(lines):
        return [[index[BOS], *(index.get(w, unk) for w in line), index[EOS]][:max_len] for line in lines]

    return Corpus(vocab, encode(splits["train"]), encode(splits["valid"]), encode(splits["test"]))


def sentence_batches(
    sentences: list[list[int]], batch_size: int, pad: int, shuffle: bool, seed: int = 0, multiple: int = 16
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of shape ``(B, T)``: each sentence predicts its next tokens;
    T is the batch's longest sentence rounded up to ``multiple`` (few distinct shapes to
    compile); padding targets are ``pad`` and ignored by the loss."""
    order = list(range(len(sentences)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        batch = [sentences[i] for i in order[start : start + batch_size]]
        longest = max(len(s) for s in batch) - 1
        length = -(-longest // multiple) * multiple
        tokens = torch.full((len(batch), length + 1), pad, dtype=torch.long)
        for row, s in enumerate(batch):
            tokens[row, : len(s)] = torch.tensor(s)
        yield tokens[:, :-1], tokens[:, 1:]
