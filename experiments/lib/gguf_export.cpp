#include "experiments/lib/gguf_export.h"

#include "datasets/gpt2_tokenizer.h"

namespace peftlab::harness {

GgufVocab gguf_vocab(const data::Tokenizer& tok) {
    GgufVocab v;
    const auto* gpt2 = dynamic_cast<const data::GPT2Tokenizer*>(&tok);
    if (!gpt2) return v;
    const int32_t n = gpt2->vocab_size();
    v.tokens.reserve(size_t(n));
    v.token_type.reserve(size_t(n));
    for (int32_t id = 0; id < n; ++id) {
        v.tokens.push_back(gpt2->token_symbols(id));
        v.token_type.push_back(id == gpt2->eot_id() ? kGgufTokenControl : kGgufTokenNormal);
    }
    v.merges.reserve(gpt2->num_merges());
    for (size_t r = 0; r < gpt2->num_merges(); ++r) v.merges.push_back(gpt2->merge_symbols(r));
    v.bos = gpt2->bos_id();
    v.eos = gpt2->eos_id();
    return v;
}

}  // namespace peftlab::harness
