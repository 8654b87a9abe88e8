#pragma once
// The tokenizer half of a GGUF export (nn/gguf.h takes the vocabulary from its
// caller, since nn knows no tokenizer).
#include "datasets/tokenizer.h"
#include "nn/gguf.h"

namespace peftlab::harness {

// llama.cpp's view of `tok`: a GPT-2 BPE tokenizer (datasets/gpt2_tokenizer.h)
// becomes tokenizer.ggml.model "gpt2" with pre-tokenizer "gpt-2", every token
// spelled as its vocab.json key, the merges in rank order, "<|endoftext|>" a
// control token and the BOS and EOS id (as convert_hf_to_gguf.py writes GPT-2).
// Any other tokenizer (peftlab's byte or word tokenizers, which llama.cpp does
// not have) gives an empty vocabulary: the file then says "no_vocab" and runs
// on token ids only.
GgufVocab gguf_vocab(const data::Tokenizer& tok);

}  // namespace peftlab::harness
