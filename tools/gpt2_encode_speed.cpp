// Times GPT2Tokenizer on a file: loading the vocabulary, encoding the whole
// file twice (the first pass fills the word cache, the second finds every word
// in it) and decoding; checks that decode(encode(text)) gives the file back.
//
//   gpt2_encode_speed <DIR with vocab.json+merges.txt or encoder.json+vocab.bpe> <FILE>
//
// Prints one line per phase: seconds and MB/s (MB = 10^6 bytes of input).
#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <sstream>
#include <string>

#include <fmt/format.h>

#include "datasets/gpt2_tokenizer.h"

namespace {
double since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
    const std::string usage = fmt::format(
        "usage: {} TOKENIZER_DIR TEXT_FILE\n"
        "  times GPT2Tokenizer on TEXT_FILE: loading TOKENIZER_DIR (vocab.json + merges.txt or encoder.json +\n"
        "  vocab.bpe), encoding twice (cold and warm word cache) and decoding; seconds and MB/s per phase\n",
        argv[0]);
    if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
        fmt::print("{}", usage);
        return 0;
    }
    if (argc != 3) {
        fmt::print(stderr, "{}", usage);
        return 2;
    }
    try {
        std::ifstream in(argv[2], std::ios::binary);
        if (!in) throw std::runtime_error(fmt::format("cannot open {}", argv[2]));
        std::stringstream ss;
        ss << in.rdbuf();
        const std::string text = std::move(ss).str();
        const double mb = double(text.size()) / 1e6;

        auto t0 = std::chrono::steady_clock::now();
        const auto tok = peftlab::data::GPT2Tokenizer::from_dir(argv[1]);
        fmt::print("load        {:.3f} s  ({} tokens, {} merges)\n", since(t0), tok.vocab_size(), tok.num_merges());
        std::vector<int32_t> ids;
        for (const char* pass : {"encode cold", "encode warm"}) {
            t0 = std::chrono::steady_clock::now();
            ids = tok.encode(text);
            const double s = since(t0);
            fmt::print("{} {:.3f} s  {:.1f} MB/s  ({} bytes -> {} ids)\n", pass, s, mb / s, text.size(), ids.size());
        }
        t0 = std::chrono::steady_clock::now();
        const std::string back = tok.decode(ids, true);
        const double s = since(t0);
        fmt::print("decode      {:.3f} s  {:.1f} MB/s  round trip {}\n", s, mb / s, back == text ? "exact" : "DIFFERS");
        return back == text ? 0 : 1;
    } catch (const std::exception& e) {
        fmt::print(stderr, "gpt2_encode_speed: {}\n", e.what());
        return 1;
    }
}
