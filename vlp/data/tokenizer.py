"""BERT WordPiece tokenizer of the text DBs: a pretrained vocab from a local dir, or one trained here.

Either way the result is a transformers ``BertTokenizerFast`` saved as a dir that
``AutoTokenizer.from_pretrained(dir)`` loads (``tokenizer.json`` + ``tokenizer_config.json``) plus the
classic ``vocab.txt`` that transformers 5 no longer writes and that older BERT code reads.

Text is encoded as UNITER's ``prepro.py`` does it: BERT normalization and pre-tokenization, WordPiece,
no [CLS]/[SEP] (the datasets add them). Nothing here touches the network: a path that is not a local
tokenizer dir is an error, never a hub name to download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast

from vlp.data.txt_db import replace_dir

# Order fixes the ids of a trained vocab: [PAD]=0 (the collate pads with 0), [UNK]=1, [CLS]=2, [SEP]=3,
# [MASK]=4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TRAINED_NAME = "wordpiece-trained"
VOCAB_FILE = "vocab.txt"
_PRETRAINED_FILES = ("tokenizer.json", "tokenizer_config.json", VOCAB_FILE)


class TokenizerError(ValueError):
    """A tokenizer dir that is missing, not a BERT WordPiece tokenizer, or lacks a special token."""


def _ascii_alphabet(lowercase: bool) -> list[str]:
    # Printable ASCII seeds the alphabet, so a character the captions never use (a '?' first met in a VQA
    # question) is a token of its own instead of [UNK].
    chars = [chr(c) for c in range(33, 127)]
    return [c for c in chars if not (lowercase and c.isupper())]


def _is_bert_punctuation(c: str) -> bool:
    # BertPreTokenizer splits these off as words of their own, so they never continue a word.
    return (c.isascii() and not c.isalnum()) or unicodedata.category(c).startswith("P")


def train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool = True) -> BertTokenizerFast:
    """A BERT-style WordPiece vocab trained on ``texts``; the same texts, in any order, give the same vocab.

    The vocab holds the special tokens first (ids as in SPECIAL_TOKENS), then, sorted, every printable ASCII
    character (lowercase only when ``lowercase``) and every other character of the normalized texts, their
    ``##`` continuations (punctuation excepted) and the trainer's pieces; at most ``vocab_size`` tokens unless
    the characters alone need more, and fewer when the texts have fewer distinct pieces. So every word made
    of ASCII or seen characters is spelt without [UNK].
    """
    model = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    model.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    alphabet = _ascii_alphabet(lowercase)
    raw: set[str] = set()
    for text in texts:
        raw.update(text)
    seen = set(model.normalizer.normalize_str("".join(sorted(raw))))
    chars = sorted({c for c in seen.union(alphabet) if not c.isspace()})
    # The trainer numbers the "##" continuations in hash-map order, and those ids break ties between equally
    # frequent merges, so the vocab changes from run to run (huggingface/tokenizers#1794). Giving every
    # continuation a fixed id up front, as a trainer special token, removes that.
    continuations = [f"##{c}" for c in chars]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *continuations], initial_alphabet=alphabet,
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)
    dead = {f"##{c}" for c in chars if _is_bert_punctuation(c)}
    rest = sorted(t for t in model.get_vocab() if t not in SPECIAL_TOKENS and t not in dead)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=lowercase)


def load_tokenizer(path: str | os.PathLike, lowercase: bool | None = None) -> BertTokenizerFast:
    """A pretrained BERT WordPiece tokenizer from a local dir (as transformers saves it, or a bare vocab.txt).

    ``lowercase`` None keeps the dir's own setting; a bare ``vocab.txt`` has none, so it must be given
    (True for an uncased vocab, False for a cased one).
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer path {path}: no such directory (only local tokenizer dirs are used)")
    present = [name for name in _PRETRAINED_FILES if (path / name).is_file()]
    if "tokenizer.json" not in present and VOCAB_FILE not in present:
        raise TokenizerError(f"tokenizer path {path}: has neither tokenizer.json nor {VOCAB_FILE}")
    if present == [VOCAB_FILE] and lowercase is None:
        raise TokenizerError(f"tokenizer path {path}: only {VOCAB_FILE}, which does not say whether the "
                             "vocab is cased: set lowercase (true for uncased, false for cased)")
    kwargs = {} if lowercase is None else {"do_lower_case": lowercase}
    try:
        tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise TokenizerError(f"tokenizer path {path}: cannot load ({' '.join(str(e).split())})") from None
    if not isinstance(tok.backend_tokenizer.model, models.WordPiece):
        raise TokenizerError(f"tokenizer path {path}: not a WordPiece tokenizer "
                             f"({type(tok.backend_tokenizer.model).__name__})")
    # transformers appends a special token the vocab lacks as an "added" token; that would shift ids.
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer path {path}: vocab lacks special token(s) {missing}")
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise TokenizerError(f"tokenizer path {path}: vocab holds only the special tokens")
    if lowercase is not None and is_lowercase(tok) != lowercase:
        raise TokenizerError(f"tokenizer path {path}: lowercase={lowercase} was asked but the tokenizer "
                             f"{'lowercases' if is_lowercase(tok) else 'keeps case'}")
    return tok


def is_lowercase(tok: BertTokenizerFast) -> bool:
    norm = tok.backend_tokenizer.normalizer
    if not isinstance(norm, normalizers.BertNormalizer):
        raise TokenizerError(f"not a BERT tokenizer: normalizer is {type(norm).__name__}, not BertNormalizer")
    return bool(norm.lowercase)


def save_tokenizer(tok: BertTokenizerFast, out_dir: str | os.PathLike) -> Path:
    """Write the tokenizer dir (plus vocab.txt) beside ``out_dir`` and rename it into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise TokenizerError("vocab ids are not contiguous from 0; cannot write vocab.txt")
    (tmp / VOCAB_FILE).write_text("".join(f"{t}\n" for t, _ in by_id), encoding="utf-8")
    replace_dir(tmp, out_dir)
    return out_dir


def encode(tok: BertTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids of each text, without [CLS]/[SEP] and untruncated (the ids ``tok(texts)`` gives)."""
    backend = tok.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        # A tokenizer.json may carry truncation or padding; work on a copy without them.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    # The Rust batch call without offsets is ~3x faster than going through transformers' __call__.
    return [enc.ids for enc in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def special_ids(tok: BertTokenizerFast) -> dict[str, int]:
    """The ids UNITER's meta.json names (CLS, SEP, MASK, UNK) plus PAD."""
    return {"CLS": tok.cls_token_id, "SEP": tok.sep_token_id, "MASK": tok.mask_token_id,
            "UNK": tok.unk_token_id, "PAD": tok.pad_token_id}


def vocab_range(tok: BertTokenizerFast) -> tuple[int, int]:
    """UNITER's ``v_range``: the ids MLM may draw a random replacement from, [start, vocab size).

    UNITER starts at '!' (999 in BERT's vocab, past [unused*] and the special tokens); a vocab without '!'
    starts just after its highest special id.
    """
    vocab = tok.get_vocab()
    start = vocab["!"] if "!" in vocab else max(special_ids(tok).values()) + 1
    return start, len(vocab)


def tokenizer_meta(tok: BertTokenizerFast, name: str) -> dict[str, Any]:
    """The tokenizer part of a txt_db's meta.json: UNITER's keys (``toker``/``tokenizer`` name the tokenizer
    as UNITER's BERT name did) and ours (PAD, vocab size, lowercasing, vocab fingerprint)."""
    return {"toker": name, "tokenizer": name, **special_ids(tok), "v_range": list(vocab_range(tok)),
            "vocab_size": len(tok.get_vocab()), "do_lower_case": is_lowercase(tok),
            "vocab_digest": vocab_digest(tok)}


def vocab_digest(tok: BertTokenizerFast) -> str:
    """Fingerprint of the vocab and lowercasing, stored with each DB to spot a mismatched tokenizer."""
    payload = json.dumps([sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), is_lowercase(tok)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
