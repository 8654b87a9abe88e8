// Tokenizers and the text corpus loader.
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <filesystem>
#include <functional>
#include <utility>

#include "datasets/corpus.h"
#include "datasets/tokenizer.h"
#include "tests/testing.h"

using namespace peftlab::data;
using peftlab::testing::TempDir;

namespace {

// Matches when the exception message contains every given fragment.
template <class E>
void require_throws_with(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
    try {
        f();
    } catch (const E& e) {
        std::string msg = e.what();
        for (const auto& frag : fragments) {
            INFO("message: " << msg);
            CHECK(msg.find(frag) != std::string::npos);
        }
        return;
    }
    FAIL("expected an exception");
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> lines;
    std::string line;
    for (char c : text) {
        if (c == '\n') lines.push_back(std::exchange(line, {}));
        else line += c;
    }
    REQUIRE(line.empty());  // every line ends in '\n'
    return lines;
}

}  // namespace

TEST_CASE("ByteTokenizer round-trips UTF-8 text byte by byte", "[datasets]") {
    ByteTokenizer tok;
    CHECK(tok.vocab_size() == 256);
    CHECK(tok.pad_id() == 0);
    CHECK(tok.bos_id() == 1);
    CHECK(tok.eos_id() == 2);

    const std::string text = "Café £20-25\n日本";
    auto ids = tok.encode(text);
    REQUIRE(ids.size() == text.size());  // one id per byte, not per code point
    CHECK(ids[0] == 'C');
    CHECK(ids[3] == 0xC3);  // é = C3 A9
    CHECK(ids[4] == 0xA9);
    CHECK(tok.decode(ids) == text);
}

TEST_CASE("ByteTokenizer skips specials on decode and rejects control bytes 0..2", "[datasets]") {
    ByteTokenizer tok;
    CHECK(tok.decode({1, 'h', 'i', 2, 0, 0}) == "hi");
    require_throws_with<std::invalid_argument>([&] { tok.encode(std::string("ab\x01", 3)); }, {"position 2", "0x01"});
    require_throws_with<std::invalid_argument>([&] { tok.encode(std::string("\0", 1)); }, {"position 0"});
    require_throws_with<std::out_of_range>([&] { tok.decode({'a', 256}); }, {"id 256", "position 1"});
    require_throws_with<std::out_of_range>([&] { tok.decode({-1}); }, {"id -1"});
}

TEST_CASE("split_words and join_words keep punctuation as tokens and space it sensibly", "[datasets]") {
    auto words = split_words("  a cheap, family-friendly café (near Blue Spice).\n");
    CHECK(words == std::vector<std::string>{"a", "cheap", ",", "family", "-", "friendly", "café", "(", "near", "Blue",
                                            "Spice", ")", "."});
    CHECK(join_words(words) == "a cheap, family-friendly café (near Blue Spice).");
    CHECK(split_words("£20-25 isn't") == std::vector<std::string>{"£20", "-", "25", "isn", "'", "t"});
    CHECK(join_words(split_words("£20-25 isn't")) == "£20-25 isn't");
    CHECK(split_words(" \t\n").empty());
}

TEST_CASE("WordTokenizer orders its vocabulary by count, then lexicographically", "[datasets]") {
    // counts: b 3, a 2, "." 1, c 1 ("." < "c" bytewise)
    auto tok = WordTokenizer::build("b a b\nc a b.", 100);
    CHECK(tok.tokens() == std::vector<std::string>{"<pad>", "<bos>", "<eos>", "<unk>", "b", "a", ".", "c"});
    CHECK(tok.vocab_size() == 8);
    CHECK(tok.encode("a b c d") == std::vector<int32_t>{5, 4, 7, WordTokenizer::kUnk});

    auto capped = WordTokenizer::build("b a b\nc a b.", 6);  // specials + the 2 most frequent
    CHECK(capped.tokens() == std::vector<std::string>{"<pad>", "<bos>", "<eos>", "<unk>", "b", "a"});
    auto frequent = WordTokenizer::build("b a b\nc a b.", 100, 2);  // drops "." and c (count 1)
    CHECK(frequent.vocab_size() == 6);

    CHECK_THROWS_AS(WordTokenizer::build("a", 3), std::invalid_argument);
    CHECK_THROWS_AS(WordTokenizer::build("a", 10, 0), std::invalid_argument);
}

TEST_CASE("WordTokenizer round-trips text, UTF-8 words and unknown words", "[datasets]") {
    const std::string corpus = "Blue Spice is a cheap, family-friendly café near the river. Café au lait (£5)!";
    auto tok = WordTokenizer::build(corpus, 1000);
    CHECK(tok.decode(tok.encode(corpus)) == corpus);
    CHECK(tok.decode(tok.encode("Café near Blue Spice.")) == "Café near Blue Spice.");

    auto ids = tok.encode("Blue Dragon");
    CHECK(ids[1] == tok.unk_id());
    CHECK(tok.decode(ids) == "Blue <unk>");
    // "<unk>" typed as text is "<", "unk", ">", never the special id.
    CHECK(tok.encode("<unk>").size() == 3);

    std::vector<int32_t> framed = {tok.bos_id()};
    for (int32_t id : tok.encode("the river")) framed.push_back(id);
    framed.push_back(tok.eos_id());
    framed.push_back(tok.pad_id());
    CHECK(tok.decode(framed) == "the river");
    CHECK_THROWS_AS(tok.decode({tok.vocab_size()}), std::out_of_range);
}

TEST_CASE("Tokenizers survive a json round trip", "[datasets]") {
    ByteTokenizer bt;
    auto bt2 = tokenizer_from_json(nlohmann::json::parse(bt.to_json().dump()));
    CHECK(bt2->vocab_size() == 256);
    CHECK(bt2->encode("héllo") == bt.encode("héllo"));

    auto wt = WordTokenizer::build("the cat sat on the mat. the café", 50);
    auto wt2 = tokenizer_from_json(nlohmann::json::parse(wt.to_json().dump()));
    CHECK(wt2->vocab_size() == wt.vocab_size());
    CHECK(wt2->to_json() == wt.to_json());
    CHECK(wt2->encode("the café sat on a mat") == wt.encode("the café sat on a mat"));
}

TEST_CASE("tokenizer_from_json names the bad key or value", "[datasets]") {
    using nlohmann::json;
    auto load = [](json j) { return [j] { tokenizer_from_json(j); }; };
    require_throws_with<std::runtime_error>(load(json::object()), {"missing key \"type\""});
    require_throws_with<std::runtime_error>(load({{"type", 3}}), {"\"type\"", "string"});
    require_throws_with<std::runtime_error>(load({{"type", "bpe"}}), {"unknown", "\"bpe\""});
    require_throws_with<std::runtime_error>(load({{"type", "word"}}), {"\"tokens\""});
    require_throws_with<std::runtime_error>(load({{"type", "word"}, {"tokens", "abc"}}), {"\"tokens\"", "array"});
    require_throws_with<std::runtime_error>(load({{"type", "word"}, {"tokens", {"<pad>", "<bos>", "<eos>", "<unk>", 7}}}),
                                            {"\"tokens\"[4]", "string"});
    require_throws_with<std::runtime_error>(load({{"type", "word"}, {"tokens", {"<bos>", "<pad>", "<eos>", "<unk>"}}}),
                                            {"token 0", "<pad>"});
    require_throws_with<std::runtime_error>(
        load({{"type", "word"}, {"tokens", {"<pad>", "<bos>", "<eos>", "<unk>", "a", "a"}}}), {"token 5", "duplicates token 4"});
}

TEST_CASE("find_invalid_utf8 reports the offending byte offset", "[datasets]") {
    CHECK_FALSE(find_invalid_utf8("plain ascii").has_value());
    CHECK_FALSE(find_invalid_utf8("café £ 日本 \xF0\x9F\x98\x80").has_value());  // 2-, 3- and 4-byte sequences
    CHECK(find_invalid_utf8("abc\xFF") == 3u);
    CHECK(find_invalid_utf8("ab\xC3") == 2u);              // sequence cut off by the end
    CHECK(find_invalid_utf8("x\xC0\xAF") == 1u);           // overlong '/'
    CHECK(find_invalid_utf8("a\xED\xA0\x80") == 1u);       // UTF-16 surrogate U+D800
    CHECK(find_invalid_utf8("\xF4\x90\x80\x80") == 0u);    // above U+10FFFF
    CHECK(find_invalid_utf8("ok \xA9") == 3u);             // continuation byte without a lead
    CHECK(find_invalid_utf8("\xC3\xA9\xC3(") == 2u);       // é, then a lead byte followed by ASCII
    CHECK(find_invalid_utf8("caf\xE9 au lait") == 3u);      // Latin-1 é
}

TEST_CASE("load_text_corpus names the file and the problem", "[datasets]") {
    TempDir dir;
    const std::string missing = dir.path("nope.txt");
    require_throws_with<std::runtime_error>([&] { load_text_corpus(missing, 0.1, 1); }, {missing, "does not exist"});
    require_throws_with<std::runtime_error>([&] { load_text_corpus(dir.dir.string(), 0.1, 1); },
                                            {dir.dir.string(), "not a regular file"});
    auto empty = dir.file("empty.txt", "");
    require_throws_with<std::runtime_error>([&] { load_text_corpus(empty, 0.1, 1); }, {empty, "empty"});
    auto blank = dir.file("blank.txt", "\n  \n\t\n");
    require_throws_with<std::runtime_error>([&] { load_text_corpus(blank, 0.1, 1); }, {blank, "empty"});
    auto binary = dir.file("bin.txt", std::string("hello\0world", 11));
    require_throws_with<std::runtime_error>([&] { load_text_corpus(binary, 0.1, 1); }, {binary, "NUL", "byte offset 5"});
    auto latin1 = dir.file("latin1.txt", "caf\xE9 au lait\n");
    require_throws_with<std::runtime_error>([&] { load_text_corpus(latin1, 0.1, 1); }, {latin1, "UTF-8", "0xe9", "byte offset 3"});
    auto ok = dir.file("ok.txt", "one line\n");
    require_throws_with<std::invalid_argument>([&] { load_text_corpus(ok, 1.0, 1); }, {"valid_fraction"});
}

TEST_CASE("load_text_corpus skips a byte-order mark and refuses what is not a bounded regular file", "[datasets]") {
    TempDir dir;
    // The mark is not part of the first word; offsets still count from the file's first byte.
    auto bom = dir.file("bom.txt", "\xEF\xBB\xBF" "first line\nsecond\n");
    CHECK(load_text_corpus(bom, 0.0, 1).train == "first line\nsecond\n");
    auto bom_latin1 = dir.file("bom_latin1.txt", "\xEF\xBB\xBF" "caf\xE9\n");
    require_throws_with<std::runtime_error>([&] { load_text_corpus(bom_latin1, 0.1, 1); }, {"byte offset 6"});
    auto bom_nul = dir.file("bom_nul.txt", std::string("\xEF\xBB\xBF" "ab\0", 6));
    require_throws_with<std::runtime_error>([&] { load_text_corpus(bom_nul, 0.1, 1); }, {"NUL", "byte offset 5"});
    // Refused before it is opened: a FIFO's open would wait for a writer forever.
    const std::string fifo = dir.path("fifo.txt");
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    require_throws_with<std::runtime_error>([&] { load_text_corpus(fifo, 0.1, 1); }, {fifo, "not a regular file"});
    // Refused by its size, before a byte of it is read (sparse: it takes no disk).
    const std::string huge = dir.file("huge.txt", "");
    std::filesystem::resize_file(huge, kMaxCorpusBytes + 1);
    require_throws_with<std::runtime_error>([&] { load_text_corpus(huge, 0.1, 1); },
                                            {huge, "1073741825 bytes", "more than the 1073741824"});
}

TEST_CASE("load_text_corpus splits lines deterministically and keeps file order", "[datasets]") {
    TempDir dir;
    std::string text;
    std::vector<std::string> all;
    for (int i = 0; i < 100; ++i) {
        all.push_back("line " + std::to_string(i) + " café");
        text += all.back() + (i % 10 == 0 ? "\r\n\n" : "\n");  // some CRLF and blank lines
    }
    auto path = dir.file("corpus.txt", text);

    auto a = load_text_corpus(path, 0.1, 42);
    auto b = load_text_corpus(path, 0.1, 42);
    auto c = load_text_corpus(path, 0.1, 43);
    CHECK(a.train == b.train);
    CHECK(a.valid == b.valid);
    CHECK(a.valid != c.valid);

    auto train = lines_of(a.train), valid = lines_of(a.valid);
    CHECK(valid.size() == 10);
    CHECK(train.size() == 90);
    // Merging the two splits by line number gives back the file, minus blanks and '\r'.
    std::vector<std::string> merged;
    size_t i = 0, j = 0;
    for (const auto& line : all) {
        if (i < train.size() && train[i] == line) merged.push_back(train[i++]);
        else if (j < valid.size() && valid[j] == line) merged.push_back(valid[j++]);
    }
    CHECK(merged == all);

    auto single = dir.file("single.txt", "only line\n");
    auto s = load_text_corpus(single, 0.5, 1);  // train always keeps a line
    CHECK(s.train == "only line\n");
    CHECK(s.valid.empty());
    CHECK(load_text_corpus(path, 0.0, 1).valid.empty());
}
