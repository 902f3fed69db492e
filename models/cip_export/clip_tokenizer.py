"""A CLIP tokenizer built offline, deterministically, for the tiny SD fixture.

The real SD-1.5 tokenizer (49408 tokens) cannot be downloaded here, and training one with the
`tokenizers` BPE trainer gives process-dependent ids (it breaks frequency ties in hash order, see
pitfalls.md). So this module learns byte-pair merges itself, with ties broken by the pair's text,
over a fixed word corpus. The result has the real tokenizer's *shape*:

- ids 0..255: the 256 byte-level symbols, in the same byte order CLIP uses;
- ids 256..511: the same symbols with the end-of-word suffix `</w>`;
- then one id per merge result, in merge order;
- then `<|startoftext|>` (bos) and `<|endoftext|>` (eos, also pad and unk), last, as in CLIP.

Any text tokenizes (every byte has a symbol); words of the corpus become single tokens.
The tokenizer is the transformers `CLIPTokenizer` class itself, so its `tokenizer.json` (normalizer,
pre-tokenizer, post-processor) is the one the real SD tokenizer ships.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words the fixtures' prompts use, plus the ImageNette class names and common caption words, so
# that the demo's prompts become short token sequences. Changing this list changes the fixture.
CORPUS = """
a photo of tench, a fish held by a man in a green jacket next to a river
a photo of english springer, a dog running on the grass in the park
a photo of cassette player, an old black machine on a wooden table
a photo of chain saw, a tool lying on the ground near a tree
a photo of church, a white building with a tall tower under a blue sky
a photo of french horn, a golden instrument played by a woman on a stage
a photo of garbage truck, a large truck parked on the street of a city
a photo of gas pump, a red pump at a station at night
a photo of golf ball, a small white ball on the green near the hole
a photo of parachute, a person flying with a colorful parachute over the sea
a photo of kite (bird of prey), a bird sitting on a branch
a photo of crane bird, two birds standing in the water
blurry, low quality, bad, ugly, distorted, cartoon, drawing, text, watermark
a painting of a cat and a dog sitting together on a red sofa
"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE uses, indexed by byte value.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) are
    shifted to code points 256 and up, in byte order. This is the table GPT-2 and CLIP use, so our
    symbols match the `ByteLevel` pre-tokenizer in tokenizer.json.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols = []
    shifted = 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _pretokenize(words_source: str) -> Counter[tuple[str, ...]]:
    """Split text exactly as the CLIP tokenizer will (normalizer + pre-tokenizer of a bare
    CLIPTokenizer), then into symbols with `</w>` on each word's last symbol."""
    from transformers import CLIPTokenizer

    bare = CLIPTokenizer(vocab=_base_vocab(), merges=[])
    backend = bare.backend_tokenizer
    counts: Counter[tuple[str, ...]] = Counter()
    for line in words_source.strip().splitlines():
        normalized = backend.normalizer.normalize_str(line)
        for word, _span in backend.pre_tokenizer.pre_tokenize_str(normalized):
            symbols = list(word)
            symbols[-1] += END_OF_WORD
            counts[tuple(symbols)] += 1
    return counts


def learn_merges(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-pair merges: most frequent adjacent pair first, ties broken by the pair's text.

    Stops when every word is a single symbol or after max_merges. Deterministic by construction.
    """
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
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


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte symbols, byte symbols + `</w>`, merge results in merge order, then bos and eos."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + END_OF_WORD] = len(vocab)
    for a, b in merges:
        # Two merges can yield the same string ("a"+"bc", "ab"+"c"); the token exists once.
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


def _base_vocab() -> dict[str, int]:
    return _vocab([])


def build_vocab_and_merges(corpus: str = CORPUS, max_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(_pretokenize(corpus), max_merges)
    return _vocab(merges), merges


def build_clip_tokenizer(model_max_length: int = 77, corpus: str = CORPUS, max_merges: int = 400):
    """The tiny fixture's tokenizer: a transformers CLIPTokenizer from an in-memory vocab and merges.

    Pass vocab= and merges= directly: the file-path constructor silently ignores its files in
    transformers 5 (pitfalls.md). The length assertion catches an empty tokenizer.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(corpus, max_merges)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    assert len(tokenizer) == len(vocab), f"tokenizer has {len(tokenizer)} tokens, vocab {len(vocab)}"
    assert tokenizer.bos_token_id == vocab[BOS_TOKEN] and tokenizer.eos_token_id == vocab[EOS_TOKEN]
    return tokenizer


def save_tokenizer_files(tokenizer, out_dir: Path) -> list[str]:
    """save_pretrained plus the classic vocab.json / merges.txt / special_tokens_map.json.

    transformers 5 writes only tokenizer.json and tokenizer_config.json; older loaders and
    optimum-style consumers expect the classic files too, so write them from the backend model
    (the single source of truth, so the two forms cannot disagree).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Calling a transformers tokenizer leaves its last padding/truncation settings on the backend,
    # and save_pretrained would write them into tokenizer.json. Save it in its neutral state (as
    # the hub's tokenizer.json files are); the manifest says how long to pad.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(str(out_dir))
    # A tokenizer loaded from disk records how it was loaded; that is not part of the tokenizer.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    model = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "pad_token": str(tokenizer.pad_token),
        "unk_token": str(tokenizer.unk_token),
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return sorted(p.name for p in out_dir.iterdir())
