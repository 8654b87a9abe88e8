// libFuzzer target: the tokenizer JSON (what Tokenizer::to_json writes and
// tokenizer_from_json reads). Input: packed records [tokenizer JSON, text].
// A tokenizer that loads must encode the text to ids inside its vocabulary and
// round-trip: bytes exactly (ByteTokenizer); for words, encode(decode(ids)) ==
// ids when no word was unknown (decode joins with join_words, which
// split_words undoes).
#include <algorithm>

#include "datasets/tokenizer.h"
#include "fuzz/fuzz.h"
#include "nn/json_limits.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    const std::vector<std::string> in = fuzz::unpack(data, size, 2);
    std::unique_ptr<data::Tokenizer> tok;
    try {
        tok = data::tokenizer_from_json(parse_json_limited(in[0], "tokenizer json"));
    } catch (const std::exception&) {
        return 0;
    }
    std::vector<int32_t> ids;
    try {
        ids = tok->encode(in[1]);
    } catch (const std::invalid_argument&) {  // ByteTokenizer: text holding its special bytes 0, 1, 2
        return 0;
    }
    for (int32_t id : ids)
        if (id < 0 || id >= tok->vocab_size()) __builtin_trap();
    const std::string text = tok->decode(ids);
    if (dynamic_cast<const data::ByteTokenizer*>(tok.get())) {
        if (text != in[1]) __builtin_trap();
    } else if (std::find(ids.begin(), ids.end(), data::WordTokenizer::kUnk) == ids.end()) {
        if (tok->encode(text) != ids) __builtin_trap();
    }
    return 0;
}
