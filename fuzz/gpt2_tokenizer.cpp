// libFuzzer target: the GPT-2 BPE tokenizer's files and its encoding of
// arbitrary bytes. Input: packed records [vocab.json, merges.txt, text]
// (fuzz/fuzz.h), read by GPT2Tokenizer::from_strings (from_dir reads the same
// contents from files). A tokenizer that loads must encode any byte string to
// ids inside its vocabulary and decode them back to exactly those bytes
// (decode(encode(s), true) == s, the documented round trip).
#include <optional>

#include "datasets/gpt2_tokenizer.h"
#include "fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    const std::vector<std::string> in = fuzz::unpack(data, size, 3);
    std::optional<data::GPT2Tokenizer> tok;
    try {
        tok.emplace(data::GPT2Tokenizer::from_strings(in[0], in[1]));
    } catch (const std::exception&) {
        return 0;
    }
    const std::vector<int32_t> ids = tok->encode(in[2]);
    for (int32_t id : ids)
        if (id < 0 || id >= tok->vocab_size()) __builtin_trap();
    if (tok->decode(ids, true) != in[2]) __builtin_trap();
    return 0;
}
