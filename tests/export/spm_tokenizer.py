"""An offline SentencePiece-style tokenizer (Llama 2 / Mistral v0.1 layout): BPE over "▁"-words with byte fallback.

sentencepiece trains the pieces; the fast tokenizer is assembled with ``tokenizers`` the way transformers converts
a SentencePiece BPE model (merges ordered by the rank of the piece they form), so GGUF's "llama" tokenizer path can be
tested without a hub download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from fasttune.tiny.tokenizer import _BASE_CORPUS

SPECIALS = ("<unk>", "<s>", "</s>")


def build_spm_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    with tempfile.TemporaryDirectory() as scratch:
        prefix = str(Path(scratch) / "spm")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_BASE_CORPUS.splitlines() * 10), model_prefix=prefix, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2, add_dummy_prefix=True,
        )
        proc = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {proc.IdToPiece(i): i for i in range(proc.GetPieceSize())}
    merges = []
    for piece, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if proc.IsControl(rank) or proc.IsUnknown(rank) or proc.IsByte(rank) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)
