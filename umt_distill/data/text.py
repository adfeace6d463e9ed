"""Captions → token ids: UMT's caption cleaning and the tokenizer (hub id, local folder, or trained here).

``pre_text`` follows UMT's preprocessing (UMT code @4fb4049: ``pre_text`` in
multi_modality/dataset/utils.py): lower-case, drop the punctuation
``,.'!?"()*#:;~``, turn ``-`` and ``/`` into spaces, collapse whitespace. Tokenisation pads to
``max_length`` and truncates (UMT pretraining: 32).

For offline tests and the quickstart, :func:`train_wordpiece_tokenizer` builds a BERT-style WordPiece
tokenizer (lower-casing, BERT pre-tokenisation, ``[CLS] … [SEP]``) from the corpus captions with
``tokenizers``; it is saved beside the run so a resumed or evaluated run uses the same vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

TRAIN_ON_CORPUS = "train-on-corpus"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


class TokenizerError(RuntimeError):
    """The tokenizer cannot be loaded or lacks a token the losses need."""


def pre_text(text: str, max_words: int | None = None) -> str:
    """Clean one caption as UMT does; keep the first ``max_words`` words if given."""
    text = _PUNCT.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).strip()
    if max_words:
        text = " ".join(text.split(" ")[:max_words])
    return text


def train_wordpiece_tokenizer(captions: Iterable[str], vocab_size: int = 1000):
    """A BERT-style WordPiece tokenizer whose vocabulary is learned from ``captions`` (cleaned first).

    The vocabulary is the special tokens, every character seen (as a word start and as a ``##``
    continuation, so any word of these characters can be spelt) and then whole words by descending
    frequency (ties alphabetical) up to ``vocab_size``. It is built deterministically on purpose: the
    ``tokenizers`` WordPieceTrainer breaks frequency ties in a different order on every run, so the
    same captions would give different token ids from run to run.

    Returns:
        A ``transformers`` fast tokenizer with ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(pre_text(caption))))
    if not counts:
        raise TokenizerError("no captions to train a tokenizer on")
    chars = sorted({ch for word in counts for ch in word})
    pieces = [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: max(vocab_size - len(pieces), 0)]
    tok = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def load_tokenizer(name_or_path: str | Path):
    """A tokenizer by hub id (``bert-base-uncased``) or local folder, checked for PAD/CLS/MASK."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        hint = "" if Path(name_or_path).exists() else " (offline? pass a local folder, or text.tokenizer=train-on-corpus)"
        raise TokenizerError(f"{name_or_path}: cannot load a tokenizer: {e}{hint}") from None
    missing = [n for n in ("pad_token_id", "cls_token_id", "mask_token_id") if getattr(tok, n) is None]
    if missing:
        raise TokenizerError(f"{name_or_path}: the tokenizer has no {', '.join(missing)}; MLM and VTC need them")
    return tok


def prepare_tokenizer(spec: str, captions: Iterable[str], save_dir: str | Path, vocab_size: int = 1000):
    """The run's tokenizer: loaded from ``save_dir`` if the run already has one, else built and saved there.

    ``spec`` is a hub id, a local folder, or ``train-on-corpus``. Saving the built tokenizer beside the
    checkpoints pins the vocabulary for resumes and evaluation. Call it on rank 0 first (it writes),
    then on the other ranks after a barrier.
    """
    save_dir = Path(save_dir)
    if (save_dir / "tokenizer_config.json").exists():
        return load_tokenizer(save_dir)
    tok = train_wordpiece_tokenizer(captions, vocab_size) if spec == TRAIN_ON_CORPUS else load_tokenizer(spec)
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.with_name(f".tmp-{save_dir.name}")
    tok.save_pretrained(str(tmp))
    # tokenizer_config.json marks a complete tokenizer (see above): it moves last.
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer_config.json"):
        f.replace(save_dir / f.name)
    tmp.rmdir()
    return load_tokenizer(save_dir)


def special_ids(tokenizer) -> dict[str, int]:
    """``pad``, ``cls`` and ``mask`` ids (what MLM masking must know)."""
    return {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "mask": tokenizer.mask_token_id}


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Clean and tokenise captions → ``input_ids`` and ``attention_mask``, long [B, max_length]."""
    out = tokenizer([pre_text(c) for c in captions], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}
