"""Offline, deterministic byte-level BPE tokenizers for the tiny captioner fixtures.

Both captioners use GPT-2's byte-level BPE (OPT reuses GPT-2's vocabulary with four special tokens
in front). The real vocabularies cannot be downloaded here, so the fixtures get a small one learned
from a built-in caption-like corpus.

Why not the `tokenizers` BPE trainer: it breaks frequency ties in hash order, so two runs give
different ids (pitfalls.md). The merge learner below breaks ties by the pair itself, so the
vocabulary, and with it every fixture byte, is the same on every run.

Why vocab/merges objects: transformers 5 tokenizers silently ignore `vocab_file=`/`merges_file=`
and return an empty tokenizer for an uncached hub id; the classes do accept `vocab=` (dict) and
`merges=` (list of pairs). Every builder checks `len(tokenizer)`.
"""

from __future__ import annotations

from collections import Counter

# Caption-like text: the merges it yields make captions decode to real words, and the prompt
# "a photo of" tokenizes to a few multi-byte tokens, as with the real vocabularies.
CORPUS = """
a photo of a dog sitting on a couch. a photo of a cat lying on a bed. a picture of a bird on a branch.
a close up of a red car parked on the street. a man riding a bike down the road. a woman holding an
umbrella in the rain. a photo of a kite flying in the blue sky. a tench fish caught by a fisherman.
an english springer dog running in the grass. a cassette player on a wooden table. a chain saw lying
in the garden. a church with a tall tower. a french horn on a stage. a garbage truck on a city street.
a gas pump at a station. a golf ball on the green. a parachute in the sky over the sea. a photo of a
small white house with a green door. two people standing next to a large tree. a group of children
playing with a ball in the park. a black and white photo of a train at the station. a bowl of fruit
on a kitchen table. a plate of food with a fork and a knife. a boat on the water near the shore.
a photo of the mountains with snow. a view of the city at night with lights. a sign on the side of
the road. a person walking a dog on the beach. a bird sitting on top of a wooden fence.
"""

# GPT-2's pre-tokenizer splits off a leading space into the word, so merged tokens look like "Ġdog".


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to the
    code points 256, 257, ... so that no token contains whitespace or control characters.
    """
    # "!".."~", "¡".."¬", "®".."ÿ": the printable bytes (0xAD, soft hyphen, is not printable).
    printable = set(range(0x21, 0x7E + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _pretokenize(text: str) -> list[str]:
    """Split text the way the runtime tokenizer will (GPT-2 regex + byte-level mapping)."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [piece for piece, _ in splitter.pre_tokenize_str(text)]


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE merge learning.

    Each round merges the most frequent adjacent pair; ties go to the lexicographically smallest
    pair, so the result depends on nothing but the corpus. Stops early when no pair occurs twice.
    """
    word_counts = Counter(_pretokenize(corpus))
    # Each word as a tuple of symbols (initially its byte-level characters).
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best_count = max(pair_counts.values())
        if best_count < 2:
            break
        best = min(pair for pair, count in pair_counts.items() if count == best_count)
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + count
        words = new_words
    return merges


def build_vocab(
    merges: list[tuple[str, str]], leading_specials: list[str], trailing_specials: list[str]
) -> dict[str, int]:
    """Ids: leading specials, the 256 byte symbols in byte order, merged tokens, trailing specials.

    OPT puts `<s> <pad> </s> <unk>` at ids 0-3; GPT-2 puts `<|endoftext|>` last.
    """
    tokens = list(leading_specials)
    tokens += [bytes_to_unicode()[b] for b in range(256)]
    for a, b in merges:
        merged = a + b
        if merged not in tokens:
            tokens.append(merged)
    tokens += list(trailing_specials)
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate token in the fixture vocabulary")
    return {token: i for i, token in enumerate(tokens)}


def opt_tokenizer(num_merges: int = 200):
    """A small OPT-style tokenizer: `</s>` is BOS and is prepended to every encoded text."""
    from transformers import GPT2Tokenizer

    merges = learn_merges(CORPUS, num_merges)
    vocab = build_vocab(merges, ["<s>", "<pad>", "</s>", "<unk>"], [])
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="left",
    )
    _check(tokenizer, len(vocab))
    if tokenizer("a photo of")["input_ids"][0] != vocab["</s>"]:
        raise AssertionError("OPT-style tokenizer must prepend </s> as BOS")
    return tokenizer


def gpt2_tokenizer(num_merges: int = 200):
    """A small GPT-2-style tokenizer: `<|endoftext|>` (the last id) is BOS, EOS and pad."""
    from transformers import GPT2Tokenizer

    merges = learn_merges(CORPUS, num_merges)
    vocab = build_vocab(merges, [], ["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    _check(tokenizer, len(vocab))
    return tokenizer


def _check(tokenizer, expected_len: int) -> None:
    """transformers 5 can build an empty tokenizer without complaint: verify it really works."""
    if len(tokenizer) != expected_len:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, expected {expected_len}")
    sample = "a photo of a dog on the grass."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if len(ids) >= len(sample.encode()):
        raise AssertionError("tokenizer merges were not applied (one id per byte)")
    if tokenizer.decode(ids) != sample:
        raise AssertionError("tokenizer does not round-trip text")
