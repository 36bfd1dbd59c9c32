"""Data sets for the experiments: Penn Treebank, sentence-level batches, and WikiText-103 or
its Wikipedia stand-in as BPE-16k tokens in fixed-length chunks (DESIGN.md §5).

    python experiments/data.py      # check PTB, build the wiki token cache, print the sizes

The token cache (``experiments/cache``; about 50 MB for the whole stand-in, whose training
split is 23.5M tokens) can be built on any machine and carried to the GPU machine, which
then spends no device time tokenising.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
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
            f"{path.parent}; pass --data-root with the folder holding ptb/ (default {DEFAULT_ROOT})"
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


@dataclass
class CharCorpus:
    """PTB as one stream of characters per split (lines joined by newlines), as ids."""

    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor


def load_ptb_chars(root: str | Path = DEFAULT_ROOT) -> CharCorpus:
    folder = Path(root) / "ptb"
    texts = {}
    for name in ("train", "valid"):
        path = folder / f"ptb.{name}.txt"
        _read_lines(path)  # the same clear error when it is missing
        texts[name] = path.read_text()
    vocab = sorted(set(texts["train"]))
    index = {c: i for i, c in enumerate(vocab)}
    unknown = index.get("_", 0)
    encode = lambda text: torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int16)
    return CharCorpus(vocab, encode(texts["train"]), encode(texts["valid"]))


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


# --- WikiText-103 (or the Wikipedia stand-in): BPE tokens in fixed-length chunks ---


@dataclass
class TokenCorpus:
    vocab_size: int
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str


def _wiki_texts(root: Path, use_datasets: bool, max_train_chars: int | None) -> tuple[dict[str, list[str]], str]:
    """Lines of each split: WikiText-103 through ``datasets`` when it can be had, else the
    Wikipedia stand-in under ``root/wiki`` (DESIGN.md; data README)."""
    if use_datasets:
        try:
            import datasets  # optional: not installed on every machine

            loaded = datasets.load_dataset("wikitext", "wikitext-103-raw-v1")
            texts = {split: [t for t in loaded[key]["text"] if t.strip()]
                     for split, key in (("train", "train"), ("valid", "validation"), ("test", "test"))}
            source = "wikitext-103-raw-v1"
        except Exception as error:  # no package, no network, no cache: use the stand-in
            print(f"datasets unavailable ({type(error).__name__}); using the Wikipedia stand-in in {root / 'wiki'}")
            texts = None
    else:
        texts = None
    if texts is None:
        folder = root / "wiki"
        paths = {"train": folder / "train.txt.xz", "valid": folder / "valid.txt", "test": folder / "test.txt"}
        for path in paths.values():
            if not path.is_file():
                raise DataMissing(
                    f"{path} not found: the Wikipedia stand-in is expected as wiki/train.txt.xz, wiki/valid.txt and "
                    f"wiki/test.txt under {root}; pass --data-root with that folder (default {DEFAULT_ROOT})"
                )
        with lzma.open(paths["train"], "rt", encoding="utf-8") as f:
            train = f.read(max_train_chars) if max_train_chars else f.read()
        texts = {"train": [line for line in train.splitlines() if line.strip()]}
        for split in ("valid", "test"):
            texts[split] = [line for line in paths[split].read_text(encoding="utf-8").splitlines() if line.strip()]
        source = "wikipedia-stand-in"
    if max_train_chars and source != "wikipedia-stand-in":
        kept, total = [], 0
        for line in texts["train"]:
            kept.append(line)
            total += len(line)
            if total >= max_train_chars:
                break
        texts["train"] = kept
    return texts, source


def load_wiki(
    root: str | Path = DEFAULT_ROOT,
    vocab_size: int = 16000,
    cache: str | Path = DEFAULT_CACHE,
    use_datasets: bool = True,
    max_train_chars: int | None = None,
) -> TokenCorpus:
    """Token ids of each split under a byte-level BPE tokenizer with ``vocab_size``
    entries trained on the training split; tokenizer and ids are cached in ``cache``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, source = _wiki_texts(Path(root), use_datasets, max_train_chars)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(f"{source}|{vocab_size}|{max_train_chars}|{len(texts['train'])}".encode()).hexdigest()[:12]
    tokenizer_path = cache / f"bpe-{vocab_size}-{digest}.json"
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(texts["train"], trainer=trainer)
        tokenizer.save(str(tokenizer_path))
    eos = tokenizer.token_to_id(EOS)
    splits = {}
    for split, lines in texts.items():
        path = cache / f"{split}-{digest}.pt"
        if path.is_file():
            splits[split] = torch.load(path)
            continue
        ids: list[int] = []
        for start in range(0, len(lines), 10_000):
            for encoding in tokenizer.encode_batch(lines[start : start + 10_000]):
                ids.extend(encoding.ids)
                ids.append(eos)
        # int16 holds any id of a vocabulary up to 32k and halves the file: the cache of the
        # whole stand-in then fits in what one device call may carry (64 MiB).
        splits[split] = torch.tensor(ids, dtype=torch.int16 if tokenizer.get_vocab_size() <= 2**15 else torch.int32)
        torch.save(splits[split], path)
    return TokenCorpus(tokenizer.get_vocab_size(), splits["train"], splits["valid"], splits["test"], source)


# --- prepared data: token ids only, for a machine without the raw text or a tokenizer ---

PREPARED_MANIFEST = "manifest.json"


def write_prepared(folder: str | Path, ptb: Corpus, wiki: TokenCorpus, wiki_vocab: int, extra: dict) -> dict:
    """Write PTB's sentences and the wiki corpus's ids (train and valid) into ``folder``, with
    a manifest saying what they are; returns the manifest.  int16 ids: the whole stand-in
    (23.5M BPE-16k tokens) and PTB fit in one device call's carry (≤ 60 MiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def flat(sentences: list[list[int]]) -> dict:
        lengths = torch.tensor([len(s) for s in sentences], dtype=torch.int32)
        ids = torch.tensor([i for s in sentences for i in s], dtype=torch.int16)
        return {"ids": ids, "lengths": lengths}

    torch.save({"vocab": ptb.vocab, **{split: flat(getattr(ptb, split)) for split in ("train", "valid", "test")}},
               folder / "ptb.pt")
    wiki_file = f"wiki-bpe{wiki_vocab}.pt"
    torch.save({"vocab_size": wiki.vocab_size, "source": wiki.source, "train": wiki.train, "valid": wiki.valid},
               folder / wiki_file)
    manifest = {
        "ptb": {"file": "ptb.pt", "vocab": len(ptb.vocab), "sentences": {s: len(getattr(ptb, s)) for s in
                                                                       ("train", "valid", "test")}},
        "wiki": {"file": wiki_file, "vocab": wiki_vocab, "vocab_size": wiki.vocab_size, "source": wiki.source,
                 "tokens": {"train": len(wiki.train), "valid": len(wiki.valid)}},
        **extra,
    }
    manifest["bytes"] = sum(f.stat().st_size for f in (folder / "ptb.pt", folder / wiki_file))
    (folder / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / PREPARED_MANIFEST
    if not path.is_file():
        raise DataMissing(f"{path} not found: build the prepared data with "
                          f"`python experiments/gpu_suite.py --prepare --prepared {folder}` on a machine with the text")
    return json.loads(path.read_text())


def load_prepared_ptb(folder: str | Path, max_len: int = 64) -> Corpus:
    """PTB from a prepared folder, each sentence cut at ``max_len`` tokens as :func:`load_ptb` does."""
    manifest = read_manifest(folder)
    saved = torch.load(Path(folder) / manifest["ptb"]["file"])

    def sentences(split: str) -> list[list[int]]:
        ids = saved[split]["ids"].long().tolist()
        out, start = [], 0
        for length in saved[split]["lengths"].tolist():
            out.append(ids[start : start + min(length, max_len)])
            start += length
        return out

    return Corpus(saved["vocab"], sentences("train"), sentences("valid"), sentences("test"))


def load_prepared_wiki(folder: str | Path, vocab: int) -> TokenCorpus:
    """The wiki corpus's ids from a prepared folder; ``vocab`` must be the one it was built with."""
    manifest = read_manifest(folder)
    if manifest["wiki"]["vocab"] != vocab:
        built = manifest["wiki"]["vocab"]
        raise DataMissing(f"the prepared data in {folder} holds a BPE-{built} wiki corpus, not BPE-{vocab}: "
                          f"pass --vocab {built}, or prepare it again with --vocab {vocab}")
    saved = torch.load(Path(folder) / manifest["wiki"]["file"])
    empty = torch.zeros(0, dtype=saved["valid"].dtype)
    return TokenCorpus(saved["vocab_size"], saved["train"], saved["valid"], empty, saved["source"])


def context_batches(
    ids: torch.Tensor, context: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) ``(B, context)`` from consecutive, non-overlapping chunks."""
    chunks = (len(ids) - 1) // context
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(chunks)
    starts = order * context
    offsets = torch.arange(context + 1)
    for first in range(0, chunks, batch_size):
        picked = starts[first : first + batch_size]
        if drop_last and len(picked) < batch_size:
            return
        window = ids[picked[:, None] + offsets].long()
        yield window[:, :-1], window[:, 1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Check PTB and build the wiki token cache.")
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="folder holding ptb/ and wiki/")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the tokenizer and token ids go")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--use-datasets", action=argparse.BooleanOptionalAction, default=True,
                        help="load WikiText-103 through `datasets` when it can be reached")
    args = parser.parse_args(argv)
    ptb = load_ptb(args.data_root)
    print(f"ptb: vocabulary {len(ptb.vocab):,}, "
          + ", ".join(f"{name} {sum(map(len, getattr(ptb, name))):,} tokens" for name in ("train", "valid", "test")))
    wiki = load_wiki(args.data_root, args.vocab, args.cache, args.use_datasets)
    print(f"wiki ({wiki.source}): vocabulary {wiki.vocab_size:,}, "
          + ", ".join(f"{name} {len(getattr(wiki, name)):,} tokens" for name in ("train", "valid", "test"))
          + f"; cached in {args.cache}")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_script(main: Callable[[], object]) -> None:
    """A script's entry point: a missing data file ends it with the message that says what
    is missing and which flag to pass, not with a traceback."""
    try:
        main()
    except DataMissing as error:
        raise SystemExit(error) from None


if __name__ == "__main__":
    run_script(main)
