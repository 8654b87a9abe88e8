// Writes the seed corpora of the libFuzzer targets (fuzz/*.cpp): valid inputs
// made by peftlab's own writers, so that fuzzing starts from files that get
// through every check and mutates from there.
//
//   write_fuzz_seeds <dir>      writes <dir>/<target>/<seed name>, e.g. fuzz/corpus/adapter/lora
//
// Inputs that hold several files are packed as fuzz/fuzz.h describes. The
// adapter seeds are made on fuzz::make_base(), the base the targets load onto.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "datasets/tokenizer.h"
#include "fuzz/fuzz.h"
#include "nn/checkpoint.h"
#include "nn/hf_gpt2.h"
#include "nn/optim.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"

using namespace peftlab;
namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

void put(const fs::path& dir, const std::string& target, const std::string& name, const std::string& bytes) {
    fs::create_directories(dir / target);
    std::ofstream(dir / target / name, std::ios::binary) << bytes;
}

// The bytes `write` puts into a scratch file.
template <class Write>
std::string bytes_of(const std::string& name, Write write) {
    const fs::path p = fuzz::scratch_dir() / name;
    write(p.string());
    return read_all(p);
}

// An adapter directory's two files, packed in the adapter targets' order.
std::string packed_dir(const fs::path& d) {
    return fuzz::pack({read_all(d / peft::kAdapterConfigFile), read_all(d / peft::kAdapterWeightsFile)});
}

}  // namespace

int main(int argc, char** argv) try {
    const bool help = argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h");
    if (argc != 2 || help || argv[1][0] == '-') {  // a flag is never the output directory
        std::fprintf(help ? stdout : stderr, "usage: write_fuzz_seeds <dir>   (writes <dir>/<target>/<seed>)\n");
        return help ? 0 : 2;
    }
    const fs::path out = argv[1];

    // safetensors: F32 tensors with metadata, a scalar and an empty tensor; F16 and BF16 by hand.
    {
        const std::vector<float> a = {1, -2, 3.5f, 0, 1e-3f, 7}, s = {42};
        put(out, "safetensors", "f32", bytes_of("st", [&](const std::string& p) {
                save_safetensors(p, {{"a", {2, 3}, a.data()}, {"scalar", {}, s.data()}, {"empty", {0, 4}, nullptr}},
                                 {{"format", "pt"}});
            }));
        const std::string header = R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},)"
                                   R"("b":{"dtype":"BF16","shape":[1,2],"data_offsets":[4,8]}})";
        std::string f = header + std::string((8 - header.size() % 8) % 8, ' ');
        const uint64_t n = f.size();
        const uint16_t halves[4] = {0x3c00, 0x7c00, 0x3f80, 0xff80};  // 1, inf (F16); 1, -inf (BF16)
        put(out, "safetensors", "f16_bf16",
            std::string(reinterpret_cast<const char*>(&n), 8) + f + std::string(reinterpret_cast<const char*>(halves), 8));
    }

    const std::unique_ptr<GPT> base = fuzz::make_base();

    // Model checkpoint.
    put(out, "checkpoint", "model", bytes_of("model", [&](const std::string& p) { save_model(p, *base); }));

    // Training state: parameters, AdamW state, two generators, the caller's extra keys.
    {
        AdamW opt(trainable_named_parameters(*base));
        Rng data_rng(1), dropout_rng(2);
        put(out, "training_state", "state", bytes_of("state", [&](const std::string& p) {
                save_training_state(p, trainable_named_parameters(*base), opt,
                                    {{"data", &data_rng}, {"dropout", &dropout_rng}}, {7, {{"data_pos", "3"}}});
            }));
    }

    // Own adapter layout: every registered method (a training file, and the
    // reparameterized prefix also as an inference file).
    const std::string hash = peft::base_hash(*base);
    for (const std::string& method : peft::method_names()) {
        peft::AdapterOptions o;
        o.n = 2, o.layers = method == "lora" ? "1" : "all";
        o.section("lora") = {{"r", 2}};
        for (const char* prefix_form : {"prefix", "prefix-kv"}) o.section(prefix_form) = {{"reparam_hidden", 4}};
        const std::unique_ptr<GPT> b = fuzz::make_base();
        std::unique_ptr<peft::Adapter> a = peft::make_adapter(method, o);
        a->attach(*b);
        const fs::path d = fuzz::scratch_dir() / ("own_" + method);
        peft::save_adapter(d.string(), *a, false, method == "full" ? hash : "");
        put(out, "adapter", method, packed_dir(d));
    }
    {
        peft::AdapterOptions o;
        o.n = 2;
        o.section("prefix") = {{"reparam", true}, {"reparam_hidden", 4}};
        const std::unique_ptr<GPT> b = fuzz::make_base();
        std::unique_ptr<peft::Adapter> a = peft::make_adapter("prefix", o);
        a->attach(*b);
        const fs::path d = fuzz::scratch_dir() / "own_prefix_reparam";
        peft::save_adapter(d.string(), *a, false);
        put(out, "adapter", "prefix_reparam", packed_dir(d));
        const fs::path di = fuzz::scratch_dir() / "own_prefix_reparam_inference";
        peft::save_adapter(di.string(), *a, true);
        put(out, "adapter", "prefix_reparam_inference", packed_dir(di));
    }

    // Hugging Face PEFT layout: what export_hf writes for each exportable method.
    for (const std::string method : {"prompt", "prefix-kv", "prefix", "lora"}) {
        peft::AdapterOptions o;
        o.n = 2, o.layers = method == std::string("lora") ? "0" : "all";
        o.positions = "hf";  // export_hf refuses "keep" with virtual tokens
        o.section("lora") = {{"r", 2}};
        const std::unique_ptr<GPT> b = fuzz::make_base();
        std::unique_ptr<peft::Adapter> a = peft::make_adapter(method, o);
        a->attach(*b);
        const fs::path d = fuzz::scratch_dir() / ("hf_" + method);
        peft::export_hf(d.string(), *a);
        put(out, "adapter_hf", method, packed_dir(d));
    }

    // Hugging Face GPT-2 directory (fuzz/hf_gpt2.cpp's records): the base as
    // one model.safetensors, and the same tensors split over two shards with
    // an index.
    {
        const fs::path d = fuzz::scratch_dir() / "hf_gpt2_single";
        save_hf_gpt2(*base, d.string());
        const std::string config = read_all(d / "config.json");
        put(out, "hf_gpt2", "single", fuzz::pack({config, read_all(d / "model.safetensors")}));
        const StFile whole = load_safetensors((d / "model.safetensors").string());
        std::vector<std::vector<StTensorRef>> shards(2);
        nlohmann::json weight_map = nlohmann::json::object();
        size_t i = 0;
        for (const auto& [key, t] : whole.tensors) {
            const size_t s = i++ % 2;
            shards[s].push_back({key, t.shape, t.data.data()});
            weight_map[key] = fmt::format("model-0000{}-of-00002.safetensors", s + 1);
        }
        std::vector<std::string> shard_bytes;
        for (size_t s = 0; s < 2; ++s)
            shard_bytes.push_back(bytes_of(fmt::format("shard{}", s),
                                           [&](const std::string& p) { save_safetensors(p, shards[s], {{"format", "pt"}}); }));
        put(out, "hf_gpt2", "sharded",
            fuzz::pack({config, "", nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", weight_map}}.dump(),
                        shard_bytes[0], shard_bytes[1]}));
    }

    // Tokenizer JSON + a text to encode.
    {
        const std::string corpus = "The Eagle is a cheap, family-friendly café near the river. It's 5-star!";
        const data::WordTokenizer word = data::WordTokenizer::build(corpus, 40);
        put(out, "tokenizer_json", "word", fuzz::pack({word.to_json().dump(), "a cheap café (near) the Eagle."}));
        put(out, "tokenizer_json", "byte", fuzz::pack({data::ByteTokenizer().to_json().dump(), "héllo, world\n"}));
    }

    // GPT-2 BPE files: every byte as its byte symbol (encoder.py's
    // bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
    // others for U+0100 + k in byte order), a few merges, "<|endoftext|>".
    {
        auto symbol = [](int b) {
            int cp = b;
            if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) {
                int k = 0;
                for (int c = 0; c < b; ++c)
                    if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) ++k;
                cp = 256 + k;
            }
            std::string u;  // UTF-8 of cp (< 0x800)
            if (cp < 0x80) u += char(cp);
            else u += char(0xC0 | (cp >> 6)), u += char(0x80 | (cp & 0x3F));
            return u;
        };
        nlohmann::json vocab = nlohmann::json::object();
        for (int b = 0; b < 256; ++b) vocab[symbol(b)] = b;
        const std::string sp = symbol(' ');
        const std::vector<std::pair<std::string, std::string>> merges = {
            {sp, "t"}, {"h", "e"}, {sp + "t", "he"}, {"l", "l"}, {"e", "ll"}, {sp, "w"}};
        std::string merges_txt = "#version: 0.2\n";
        int id = 256;
        for (const auto& [a, b] : merges) {
            merges_txt += a + " " + b + "\n";
            vocab[a + b] = id++;
        }
        vocab["<|endoftext|>"] = id;
        put(out, "gpt2_tokenizer", "small",
            fuzz::pack({vocab.dump(), merges_txt, "hello the world<|endoftext|> caf\xc3\xa9 \xff\x01 tell"}));
    }

    // Data files (datasets/files.h): CSV with quoting, BOM and CRLF; TSV; JSONL.
    put(out, "data_csv", "e2e", std::string(1, '\0') + read_all("tests/fixtures/data/restaurants.csv"));
    put(out, "data_csv", "quoting",
        std::string(1, '\0') + "\xEF\xBB\xBFmr,ref\r\n\"a, b\",\"say \"\"hi\"\"\"\r\nplain,\"two\nlines\"\r\n\r\nx,\n");
    put(out, "data_csv", "tsv", std::string(1, '\1') + "input\toutput\na b\t\"c\td\"\ne\tf\n");
    put(out, "data_jsonl", "reviews", read_all("tests/fixtures/data/reviews.jsonl"));
    put(out, "data_jsonl", "types",
        "{\"text\": \"caf\\u00e9\", \"label\": 1.5, \"ok\": true}\r\n\n{\"text\": [1], \"label\": null}\n");

    // Command lines (NUL-separated arguments).
    const std::vector<std::vector<std::string>> lines = {
        {"--config", "tiny", "--steps", "5", "--methods", "lora,prompt"},
        {"--methods", "prefix:reparam=true,lora:r=4", "--prefix-len", "4", "--lr", "0.01", "--seed", "3", "--tokenizer", "byte"},
        {"--seq", "32", "--d-model", "64", "--heads", "4", "--layers", "2", "--d-ff", "128"},
        {"--task", "classify", "--batch", "8", "--n-train", "100", "--eval-examples", "20", "--threads", "1"},
        {"--out=runs/x", "--pretrain-steps", "10", "--methods", "prefix:oops", "--corpus", "c.txt", "17"},
        {"--train", "d.csv", "--valid", "v.csv", "--input-field", "mr", "--output-field", "ref", "--truncate", "right"},
        {"--train", "d.jsonl", "--label-field", "label", "--label-words", "0=negative,1=positive", "--task-type",
         "classification"},
    };
    for (size_t i = 0; i < lines.size(); ++i) {
        std::string s;
        for (size_t k = 0; k < lines[i].size(); ++k) s += (k ? std::string(1, '\0') : "") + lines[i][k];
        put(out, "flags", fmt::format("args{}", i), s);
    }
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "write_fuzz_seeds: %s\n", e.what());
    return 1;
}
