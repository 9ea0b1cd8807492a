"""CLIP's byte-level BPE tokeniser, as ViCLIP's text encoder expects it.

Facts (OpenAI CLIP, which ViCLIP copies): the vocabulary is the 256 byte symbols, the same with an
end-of-word mark `</w>`, the first 48,894 merges of `bpe_simple_vocab_16e6.txt.gz` (file order =
merge priority), then <|startoftext|> = 49406 and <|endoftext|> = 49407: 49,408 ids. Text is cleaned
(ftfy, HTML unescaped twice, whitespace runs collapsed, lower-cased), split by CLIP's regex, each
piece's UTF-8 bytes are mapped to printable symbols and merged by BPE. A row is
[SOT, tokens..., EOT] zero-padded to the context length (32 for ViCLIP); a longer row is cut to the
context length with its last id set to EOT. The vocabulary file is read from the installed open_clip
package, which ships it.
"""

import functools
import gzip
import html
import importlib.util
import os

import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
# Contractions, runs of letters, single digits, runs of other non-space characters.
_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)


def vocab_path():
    """Path of open_clip's bundled BPE merges file (UserError when open_clip is not installed)."""
    from helpers import UserError

    spec = importlib.util.find_spec("open_clip")
    path = spec and os.path.join(spec.submodule_search_locations[0], VOCAB_FILE)
    if not path or not os.path.isfile(path):
        raise UserError(
            f"{VOCAB_FILE}: not found (it ships with open_clip); install it with "
            f"`pip install open_clip_torch==3.3.0` (see requirements.txt)"
        )
    return path


@functools.lru_cache(maxsize=1)
def byte_symbols():
    """The 256 bytes -> printable unicode characters: printable Latin-1 bytes map to themselves,
    the others (controls, space, ...) to code points 256, 257, ... in byte order. The dict's order
    (printable bytes first) is the order of the first 256 vocabulary ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def clean(text):
    """CLIP's text cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """tokenizer(texts, context_length=32) -> LongTensor [B, context_length]; encode(text) -> ids."""

    def __init__(self, path=None):
        with gzip.open(path or vocab_path(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.words = {SOT: [SOT], EOT: [EOT]}  # memo of bpe()

    def bpe(self, piece):
        """One pre-split piece (already mapped to byte symbols) -> its BPE tokens."""
        if piece in self.words:
            return self.words[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            ranks = [self.rank.get(pair, NUM_MERGES) for pair in zip(word, word[1:])]
            best = min(ranks)
            if best == NUM_MERGES:
                break
            first, second = word[ranks.index(best)], word[ranks.index(best) + 1]
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.words[piece] = word
        return word

    def encode(self, text):
        """Token ids of `text`, without SOT/EOT."""
        table = byte_symbols()
        ids = []
        for piece in _SPLIT.findall(clean(text)):
            ids += [self.ids[tok] for tok in self.bpe("".join(table[b] for b in piece.encode("utf-8")))]
        return ids

    def __call__(self, texts, context_length=32):
        """texts: str or list of str -> LongTensor [B, context_length]: SOT, ids, EOT, zeros; rows
        longer than the context are cut and end with EOT."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID] + self.encode(text) + [EOT_ID]
            if len(ids) > context_length:
                ids = ids[: context_length - 1] + [EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The tokeniser built once per process (reading the merges takes ~0.3 s)."""
    return ClipTokenizer()
