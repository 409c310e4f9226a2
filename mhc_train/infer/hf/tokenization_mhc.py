"""The sentencepiece tokenizer of an mhc-train run for Hugging Face `transformers` (AutoTokenizer).

Copied by `mhc-train export` next to `tokenizer.model`; loaded with
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`. It calls sentencepiece itself, so its ids equal
mhc-train's for every text (byte fallback, no normalisation, no dummy prefix, no BOS: the model was trained that way).
Needs only transformers and sentencepiece.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MHCTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        eos = self.sp.id_to_piece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        unk = self.sp.id_to_piece(self.sp.unk_id()) if self.sp.unk_id() >= 0 else None
        kwargs.setdefault("eos_token", eos)
        kwargs.setdefault("unk_token", unk)
        kwargs.setdefault("pad_token", eos)  # batched inputs pad with EOS (masked out by attention_mask)
        kwargs.setdefault("padding_side", "left")  # generation continues at the right edge of every row
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode_pieces(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])  # no BOS / EOS added: the model was trained on raw text

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
