// Tasks from files (datasets/files.h): the JSONL and CSV/TSV readers against
// RFC 4180 / JSON Lines semantics written out by hand, every error naming the
// file and line, multi-reference grouping, classification labels, the seeded
// split of a single file, the truncation modes (datasets/batch.h) and the
// scorers of datasets/task.h.
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <set>

#include "datasets/batch.h"
#include "datasets/files.h"
#include "datasets/tokenizer.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::data;
using Catch::Matchers::Contains;
using Catch::Matchers::EndsWith;
using Catch::Matchers::StartsWith;

namespace {

std::vector<std::string> column(const Table& t, const std::string& name) {
    std::vector<std::string> out;
    for (const Row& r : t.rows) out.push_back(r.fields.at(name));
    return out;
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST_CASE("CSV: quoted commas, doubled quotes, embedded newlines, BOM and CRLF as RFC 4180 says", "[datasets_files]") {
    // RFC 4180 sec. 2: a quoted field may hold the delimiter, CRLF and "" for one quote.
    const std::string text =
        "\xEF\xBB\xBFmr,ref\r\n"
        "\"name[A], food[B]\",\"He said \"\"hi\"\", twice\"\r\n"
        "plain,\"two\nlines\"\r\n"
        "\r\n"
        " spaced ,\"\"\r\n"
        "last,row";  // no final line end
    Table t = parse_delimited(text, "x.csv", ',');
    CHECK(t.columns == std::vector<std::string>{"mr", "ref"});  // the BOM is not part of the first name
    CHECK(column(t, "mr") == std::vector<std::string>{"name[A], food[B]", "plain", " spaced ", "last"});
    CHECK(column(t, "ref") == std::vector<std::string>{"He said \"hi\", twice", "two\nlines", "", "row"});
    // Lines where the records start: the quoted newline moves the later ones down.
    std::vector<size_t> lines;
    for (const Row& r : t.rows) lines.push_back(r.line);
    CHECK(lines == std::vector<size_t>{2, 3, 6, 7});
    CHECK(t.blank_rows == 1);
    // An empty field is refused when it is used, naming file, line and field.
    CHECK_THROWS_WITH(t.field(t.rows[2], "ref"), "x.csv:6: field 'ref' is empty");
    CHECK_THROWS_WITH(t.field(t.rows[0], "output"), Contains("x.csv:2: no field 'output' (fields: mr, ref)"));
}

TEST_CASE("TSV: tab-delimited with the same quoting", "[datasets_files]") {
    Table t = parse_delimited("input\toutput\na, b\t\"x\ty\"\n", "x.tsv", '\t');
    CHECK(column(t, "input") == std::vector<std::string>{"a, b"});
    CHECK(column(t, "output") == std::vector<std::string>{"x\ty"});
}

TEST_CASE("CSV errors name the file and the line", "[datasets_files]") {
    auto err = [](const std::string& text) { return error_of([&] { parse_delimited(text, "d.csv", ','); }); };
    CHECK_THAT(err("a,b\n1,2\n\"open,3\n4,5\n"), Contains("d.csv:3:") && Contains("never closed"));
    CHECK_THAT(err("a,b\n1,2\nx\"y,3\n"), Contains("d.csv:3: malformed CSV"));
    CHECK_THAT(err("a,b\n1,2\n\"q\"z,3\n"), Contains("d.csv:3: malformed CSV"));
    CHECK_THAT(err("a,b\n1,2\n1,2,3\n"), Contains("d.csv:3: 3 fields, the header has 2 (a, b)"));
    CHECK_THAT(err("a,a\n1,2\n"), Contains("d.csv:1: header names column 'a' twice"));
    CHECK_THAT(err(""), Contains("d.csv: empty file"));
    CHECK_THAT(err("\n\r\n"), Contains("d.csv: empty file"));
    CHECK_THAT(err("a,b\n1,2\ncaf\xE9,3\n"), Contains("d.csv:3: invalid UTF-8 at byte 11"));
    // Offsets count from the file's first byte, a byte-order mark included.
    CHECK_THAT(err("\xEF\xBB\xBF" "a,b\n1,2\ncaf\xE9,3\n"), Contains("d.csv:3: invalid UTF-8 at byte 14"));
    CHECK_THAT(err("\xEF\xBB\xBF" "a,b\nx\"y,3\n"), Contains("d.csv:2: malformed CSV") && Contains("at byte 8:"));  // the quote
    CHECK_THAT(err(std::string("a,b\n1,\0\n", 8)), Contains("d.csv:2: NUL byte"));
    CHECK_THAT(err("a,b\n" + std::string(kMaxRowBytes + 10, 'x') + ",1\n"), Contains("d.csv:2: a record longer than"));
}

TEST_CASE("CSV errors count line ends as records do (CR or LF or CRLF)", "[datasets_files]") {
    auto err = [](const std::string& text) { return error_of([&] { parse_delimited(text, "d.csv", ','); }); };
    // A line ends at a CR, an LF or a CRLF for every message, as for the ragged row (the first check).
    for (const char* nl : {"\r", "\r\n", "\n"}) {
        auto lines = [&](std::initializer_list<std::string> ls) {
            std::string t;
            for (const std::string& l : ls) t += l + nl;
            return t;
        };
        INFO("line end " << (nl[0] == '\n' ? "LF" : nl[1] ? "CRLF" : "CR"));
        CHECK_THAT(err(lines({"a,b", "1,2", "1,2,3"})), Contains("d.csv:3: 3 fields"));
        CHECK_THAT(err(lines({"a,b", "1,2", "x\"y,3"})), Contains("d.csv:3: malformed CSV"));
        CHECK_THAT(err(lines({"a,b", "1,2", std::string("\0,3", 3)})), Contains("d.csv:3: NUL byte"));
        CHECK_THAT(err(lines({"a,b", "1,2", "caf\xE9,3"})), Contains("d.csv:3: invalid UTF-8"));
        // A line end inside quotes is a line too: the ragged record after it is on line 4.
        CHECK_THAT(err(lines({"a,b", "\"x" + std::string(nl) + "y\",1", "1,2,3"})), Contains("d.csv:4: 3 fields"));
    }
}

TEST_CASE("JSONL: one object per line; numbers and booleans are text as written", "[datasets_files]") {
    Table t = parse_jsonl("{\"text\": \"ok\", \"label\": 1}\r\n\n  \n{\"text\": \"caf\\u00e9\", \"label\": true, "
                          "\"meta\": [1]}\n",
                          "r.jsonl");
    CHECK(column(t, "text") == std::vector<std::string>{"ok", "caf\xC3\xA9"});
    CHECK(column(t, "label") == std::vector<std::string>{"1", "true"});
    // Integers as JSON reads them: -0 is 0, as Python's json.loads('-0') gives 0
    // (a JSONL label column read by the datasets library merges them too).
    CHECK(column(parse_jsonl("{\"l\": -0}\n{\"l\": 0}\n", "z.jsonl"), "l") == std::vector<std::string>{"0", "0"});
    // Floats too, as the file spells them (a parsed double prints 1.50 as 1.5, 1e2 as 100.0).
    const Table f = parse_jsonl("{\"s\": 1.50, \"e\": 1e2, \"n\": [2.50]}\n{\"s\": 2.0, \"e\": -3E-1}\n", "f.jsonl");
    CHECK(column(f, "s") == std::vector<std::string>{"1.50", "2.0"});
    CHECK(column(f, "e") == std::vector<std::string>{"1e2", "-3E-1"});
    CHECK_THROWS_WITH(f.field(f.rows[0], "n"), "f.jsonl:1: field 'n' is an array, expected text");
    const Table nulls = parse_jsonl("{\"label\": null}\n", "n.jsonl");
    CHECK_THROWS_WITH(nulls.field(nulls.rows[0], "label"), "n.jsonl:1: field 'label' is null, expected text");
    CHECK(t.rows[1].line == 4);
    CHECK(t.blank_rows == 2);
    CHECK_THROWS_WITH(t.field(t.rows[1], "meta"), "r.jsonl:4: field 'meta' is an array, expected text");
    CHECK_THROWS_WITH(t.field(t.rows[0], "input"), "r.jsonl:1: no field 'input' (fields: label, text)");
}

TEST_CASE("JSONL errors name the file and the line", "[datasets_files]") {
    auto err = [](const std::string& text) { return error_of([&] { parse_jsonl(text, "r.jsonl"); }); };
    CHECK_THAT(err("{\"a\": 1}\n{\"a\": }\n"), Contains("r.jsonl:2: malformed JSON (column 7: syntax error") &&
                                                   EndsWith("unexpected '}'; expected '[', '{', or a literal)"));
    CHECK_THAT(err("{\"a\": 1}\n[1, 2]\n"), Contains("r.jsonl:2: a JSON array, expected an object"));
    CHECK_THAT(err("{\"a\": 1}\n{\"a\": 1}{\"b\": 2}\n"), Contains("r.jsonl:2: malformed JSON"));
    // Found by fuzz/data_jsonl.cpp: a number beyond double (nlohmann's out_of_range, not a
    // parse_error) escaped as another exception type, without file and line.
    CHECK_THAT(err("{\"a\": 1}\n{\"a\": 8e98888088888888888888888}\n"),
               Contains("r.jsonl:2: malformed JSON") && Contains("number overflow"));
    CHECK_THAT(err(std::string(100, '[') + "\n"), Contains("r.jsonl:1: malformed JSON (JSON nested deeper than 64 levels)"));
    CHECK_THAT(err("\n\n"), Contains("r.jsonl: empty file"));
    CHECK_THAT(err("{\"a\": \"\xFF\"}\n"), Contains("r.jsonl:1: invalid UTF-8"));
    // The word "column" in a key is not nlohmann's position, which alone is cut at.
    CHECK(err("{\"column\": 1, \"column\": 2}\n") == "r.jsonl:1: malformed JSON (duplicate key \"column\")");
    CHECK_THAT(err("{\"a, column 9\": }\n"), StartsWith("r.jsonl:1: malformed JSON (column 17: syntax error"));
    // JSON Lines end at an LF alone: a CR is JSON whitespace, and the NUL is on line 1.
    CHECK_THAT(err(std::string("{\"a\":\r1}\r{\"b\": \"\0\"}\n", 20)), Contains("r.jsonl:1: NUL byte"));
}

TEST_CASE("read_table picks the format by extension and refuses others", "[datasets_files]") {
    testing::TempDir tmp;
    CHECK(read_table(tmp.file("a.CSV", "x\n1\n")).rows.size() == 1);
    CHECK(read_table(tmp.file("a.tsv", "x\ty\n1\t2\n")).columns.size() == 2);
    CHECK_THROWS_WITH(read_table(tmp.file("a.txt", "x\n")), Contains("unknown data format '.txt'"));
    CHECK_THROWS_WITH(read_table(tmp.path("missing.csv")), Contains("missing.csv: no such file"));
    std::filesystem::create_directory(tmp.path("dir.csv"));
    CHECK_THROWS_WITH(read_table(tmp.path("dir.csv")), Contains("dir.csv: not a regular file (a directory)"));
    REQUIRE(::mkfifo(tmp.path("fifo.csv").c_str(), 0600) == 0);  // whose open would block
    CHECK_THROWS_WITH(read_table(tmp.path("fifo.csv")), Contains("fifo.csv: not a regular file (a device, FIFO or socket)"));
}

TEST_CASE("read_table reads to the end whatever the file's size said", "[datasets_files]") {
    // A /proc file is a regular file whose size is 0: its text ("Linux\n") was once read as 1 byte.
    const std::filesystem::path proc = "/proc/sys/kernel/ostype";
    if (!std::filesystem::exists(proc)) {
        WARN(proc << " is missing here: nothing to read");
        return;
    }
    REQUIRE(std::filesystem::file_size(proc) == 0);
    testing::TempDir tmp;
    std::filesystem::create_symlink(proc, tmp.path("ostype.csv"));
    const Table t = read_table(tmp.path("ostype.csv"));
    CHECK(t.columns == std::vector<std::string>{"Linux"});
    CHECK(t.rows.empty());
}

TEST_CASE("a control byte under the byte tokenizer is reported at its file:line and field", "[datasets_files]") {
    testing::TempDir tmp;
    ByteTokenizer tok;
    auto fit = [&](Task t) { return error_of([&] { fit_to_context(t, tok, 64, Truncate::Left); }); };
    FileTaskOptions o;
    o.train = tmp.file("g.jsonl", "{\"input\": \"a\", \"output\": \"x\"}\n{\"input\": \"b\\u0001\", \"output\": \"y\"}\n");
    o.valid = o.test = tmp.file("v.jsonl", "{\"input\": \"v\", \"output\": \"w\"}\n");
    CHECK(fit(load_file_task(o)) == o.train + ":2: field 'input': ByteTokenizer::encode: byte 0x01 at position 1 "
                                          "collides with a special id (0=PAD, 1=BOS, 2=EOS); text must not contain "
                                          "these control bytes");
    // Line 3's output is also a reference of line 1's example, which comes first: line 3 is named.
    o.train = tmp.file("r.csv", "in,out\nA,a\nB,b\nA,\x02z\n");
    o.valid = o.test = tmp.file("v.csv", "in,out\nV,v\n");
    o.input_field = "in", o.output_field = "out";
    CHECK_THAT(fit(load_file_task(o)), StartsWith(o.train + ":4: field 'out': ByteTokenizer::encode: byte 0x02 at position 0"));
    // In a test split, an input's later rows are its example's further references.
    o.train = tmp.file("t.csv", "in,out\nA,a\n");
    o.test = tmp.file("test.csv", "in,out\nE,e\nE,\x01" "e\n");
    CHECK_THAT(fit(load_file_task(o)), StartsWith(o.test + ":2: field 'out', reference 2 of 2: ByteTokenizer::encode"));
    // Classification: the target is the label's word.
    FileTaskOptions c;
    c.classification = true;
    c.train = tmp.file("c.csv", "text,label\ngood,pos\nbad,neg\nfine,pos\n");
    c.valid = c.test = tmp.file("cv.csv", "text,label\nok,pos\n");
    c.label_words = {{"neg", "n\x01"}};
    CHECK_THAT(fit(load_file_task(c)), StartsWith(c.train + ":3: the label word of field 'label': ByteTokenizer::encode"));
    // Generated data have no file: the task, split and index say where.
    Task generated;
    generated.name = "gen";
    generated.train = generated.valid = generated.test = {Example{"s", "t\x01", {"t\x01"}, {}, ""}};
    CHECK_THAT(fit(generated), StartsWith("gen train example 0: target: ByteTokenizer::encode: byte 0x01 at position 1"));
}

TEST_CASE("generation files: rows sharing an input are one example with every reference", "[datasets_files]") {
    testing::TempDir tmp;
    FileTaskOptions o;
    o.train = tmp.file("train.csv", "mr,ref\nA,a one\nB,b one\nA,a two\nA,a one\nC,c one\n");
    o.valid = tmp.file("valid.csv", "mr,ref\nD,d one\n");
    o.test = tmp.file("test.csv", "mr,ref\nE,e one\nF,f one\nE,e two\nE,e three\n");
    o.input_field = "mr", o.output_field = "ref";
    Task t = load_file_task(o);
    // Training: every distinct (input, output) pair, each knowing all its input's references.
    REQUIRE(t.train.size() == 4);
    CHECK(t.train[0].source == "A");
    CHECK(t.train[0].target == "a one");
    CHECK(t.train[2].target == "a two");
    CHECK(t.train[2].references == std::vector<std::string>{"a one", "a two"});
    CHECK(t.train[2].origin == o.train + ":4");
    CHECK(t.report.splits.at("train").duplicate_rows == 1);  // "A,a one" again
    CHECK(t.report.left_out() == 1);
    // Test: each input once, first reference as the target, all as references.
    REQUIRE(t.test.size() == 2);
    CHECK(t.test[0].source == "E");
    CHECK(t.test[0].target == "e one");
    CHECK(t.test[0].references == std::vector<std::string>{"e one", "e two", "e three"});
    CHECK(t.report.splits.at("test").pairs == 4);
    CHECK(t.report.splits.at("test").examples == 2);
    // The scorer reads every reference: output "e three" is a perfect BLEU for E.
    Score s = t.score(t.test, {"e three", "f one"});
    CHECK(s.name == "bleu");
    CHECK(s.value == Approx(0.0));  // 2 tokens each: no 4-gram, BLEU-4 is 0 (Papineni)
    REQUIRE(s.flags.size() == 1);     // ... which the result says, with the words that do match
    CHECK_THAT(s.flags[0], Contains("bleu 0: no 4-gram matches (0 of 0 4-grams in 2 hypotheses") &&
                               Contains("4 of 4 words match; see rouge_l = 1.0000"));
    CHECK(t.score(t.test, {"x", "y"}).flags.empty());  // nothing matches: nothing to explain
    Task long_refs = t;
    long_refs.test = {Example{"E", "x", {"the cat sat on the mat", "a dog lay on a rug"}, {}, ""}};
    CHECK(long_refs.score(long_refs.test, {"a dog lay on a rug"}).value == Approx(1.0));
    CHECK(long_refs.score(long_refs.test, {"a dog lay on a rug"}).extra.at("rouge_l") == Approx(1.0));
    CHECK(t.metric_name() == "bleu");
    CHECK(t.defaults.max_new_tokens == 0);  // found from the data once tokenized
}

TEST_CASE("generation files: missing fields and empty values name file, line and field", "[datasets_files]") {
    testing::TempDir tmp;
    FileTaskOptions o;
    o.train = tmp.file("t.jsonl", "{\"input\": \"a\", \"output\": \"b\"}\n{\"input\": \"c\"}\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("t.jsonl:2: no field 'output'"));
    o.train = tmp.file("t.csv", "input,output\na,b\nc,\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("t.csv:3: field 'output' is empty"));
    o.train = tmp.file("t2.csv", "mr,ref\na,b\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("t2.csv:1: the header has no column 'input' (columns: 'mr', 'ref')"));
    o.train = tmp.file("tl.csv", "text,label\na,b\n");  // a classification file read as generation
    CHECK_THROWS_WITH(load_file_task(o), "" + o.train + ":1: the header has no column 'input' (columns: 'text', "
                                         "'label'); it has classification's columns: --task-type classification");
    o.train = tmp.file("t3.csv", "input,ref\n");  // said at the header even with no data rows
    CHECK_THROWS_WITH(load_file_task(o), Contains("t3.csv:1: the header has no column 'output' (columns: 'input', 'ref')"));
    o.train = tmp.file("h.csv", "input,output\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("h.csv: no data rows"));
    o.train = tmp.file("two.csv", "input,output\na,b\nc,d\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("2 distinct input(s)"));
}

TEST_CASE("one file splits by distinct input, deterministically in the seed", "[datasets_files]") {
    testing::TempDir tmp;
    std::string csv = "input,output\n";
    for (int i = 0; i < 40; ++i)
        for (int r = 0; r < 1 + i % 3; ++r) csv += "in" + std::to_string(i) + ",out" + std::to_string(r) + "\n";
    FileTaskOptions o;
    o.train = tmp.file("all.csv", csv);
    o.seed = 5;
    Task a = load_file_task(o), b = load_file_task(o);
    o.seed = 6;
    Task c = load_file_task(o);
    auto sources = [](const std::vector<Example>& v) {
        std::vector<std::string> s;
        for (const Example& e : v) s.push_back(e.source);
        return s;
    };
    CHECK(sources(a.test) == sources(b.test));
    CHECK(sources(a.train) == sources(b.train));
    CHECK(sources(a.test) != sources(c.test));
    // 10% of 40 inputs each for valid and test; no input in two splits; every row used.
    CHECK(a.valid.size() == 4);
    CHECK(a.test.size() == 4);
    const std::vector<std::string> train_sources = sources(a.train);
    std::set<std::string> train_in(train_sources.begin(), train_sources.end());
    CHECK(train_in.size() == 32);
    for (const auto* split : {&a.valid, &a.test})
        for (const Example& e : *split) CHECK_FALSE(train_in.count(e.source));
    size_t pairs = a.train.size();
    for (const auto* split : {&a.valid, &a.test})
        for (const Example& e : *split) pairs += e.references.size();
    CHECK(pairs == 79);  // the sum over i < 40 of 1 + i % 3
    REQUIRE_FALSE(a.report.notes.empty());
    CHECK_THAT(a.report.notes[0], Contains("40 distinct inputs: 4 valid, 4 test, 32 train (seed 5)"));
}

TEST_CASE("classification files: labels from the data, label words, unseen labels refused", "[datasets_files]") {
    testing::TempDir tmp;
    FileTaskOptions o;
    o.classification = true;
    o.train = tmp.file("tr.jsonl", "{\"text\": \"good\", \"label\": 1}\n{\"text\": \"bad\", \"label\": 0}\n"
                                   "{\"text\": \"fine\", \"label\": 1}\n");
    o.valid = tmp.file("va.jsonl", "{\"text\": \"meh\", \"label\": 0}\n");
    o.test = tmp.file("te.jsonl", "{\"text\": \"great\", \"label\": 1}\n{\"text\": \"awful\", \"label\": 0}\n");
    Task t = load_file_task(o);
    CHECK(t.labels == std::vector<std::string>{"0", "1"});  // sorted
    CHECK(t.train[0].target == "1");
    o.label_words = {{"0", "negative"}, {"1", "positive"}};
    t = load_file_task(o);
    CHECK(t.labels == std::vector<std::string>{"negative", "positive"});
    CHECK(t.test[1].target == "negative");
    CHECK(t.metric_name() == "accuracy");
    // Accuracy and macro-F1 (sklearn's definition) of label-word predictions.
    Score s = t.score(t.test, {" positive.", "positively"});
    CHECK(s.value == Approx(0.5));
    // gold {1, 0}, predicted {1, none}: classes none/0/1 with F1 0, 0, 1 -> 1/3.
    CHECK(s.extra.at("macro_f1") == Approx(1.0 / 3.0));
    CHECK(t.score(t.test, {"negative", "negative"}).flags ==
          std::vector<std::string>{"single class: predicts \"negative\" for all 2 examples"});
    CHECK(t.score(t.test, {"negative", "negative"}).flags_one_kind);
    CHECK_FALSE(t.score(t.test, {"negative", "positive"}).flags_one_kind);
    // No label word in any answer: the answers in words, not the first one as if every example gave it.
    CHECK(t.score(t.test, {"meh", "so so"}).flags ==
          std::vector<std::string>{"single class: answers no label word for all 2 examples (2 distinct answers, none "
                                   "repeated)"});
    CHECK(t.score(t.test, {"meh", "meh"}).flags ==
          std::vector<std::string>{"single class: answers no label word for all 2 examples (all \"meh\")"});

    o.test = tmp.file("te2.jsonl", "{\"text\": \"great\", \"label\": 1}\n{\"text\": \"odd\", \"label\": 2}\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("te2.jsonl:2: field 'label': label '2' never occurs in the training data"));
    o.test = tmp.file("te3.jsonl", "{\"text\": \"great\", \"label\": [1]}\n");
    CHECK_THROWS_WITH(load_file_task(o), Contains("te3.jsonl:1: field 'label' is an array"));
    o.test = tmp.path("te.jsonl");
    o.label_words = {{"7", "seven"}};
    CHECK_THROWS_WITH(load_file_task(o), Contains("--label-words: label '7' does not occur"));
    o.label_words = {{"0", "same"}, {"1", "same"}};
    CHECK_THROWS_WITH(load_file_task(o), Contains("the same word 'same'"));
    // "text, pos": the label is " pos", not a new class beside "pos" by accident.
    FileTaskOptions spaced;
    spaced.classification = true;
    spaced.train = tmp.file("spaced.csv", "text,label\ngood,pos\nfine, pos\nbad,neg\n");
    spaced.valid = spaced.test = tmp.file("spaced_vt.csv", "text,label\nok,pos\n");
    CHECK_THROWS_WITH(load_file_task(spaced), "" + spaced.train + ":3: field 'label': label ' pos' has surrounding spaces, "
                                              "which would be part of its word (a CSV keeps the space after a comma); "
                                              "remove them or map the label with --label-words");
    spaced.label_words = {{" pos", "positive"}};
    CHECK_NOTHROW(load_file_task(spaced));
    // In a test file, the label is named with the training label it would be without its spaces.
    spaced.train = tmp.file("clean.csv", "text,label\ngood,pos\nbad,neg\n");
    spaced.test = tmp.file("spaced_test.csv", "text,label\nfine,pos \n");
    spaced.label_words.clear();
    CHECK_THROWS_WITH(load_file_task(spaced), Contains("spaced_test.csv:2: field 'label': label 'pos ' never occurs") &&
                                                  Contains("; without its surrounding spaces it would be label 'pos'"));
}

TEST_CASE("file tasks refuse one field for both sides and a single label", "[datasets_files]") {
    testing::TempDir tmp;
    FileTaskOptions o;
    o.train = tmp.file("g.jsonl", "{\"input\": \"a\", \"output\": \"b\"}\n");
    o.input_field = o.output_field = "input";
    CHECK_THROWS_WITH(load_file_task(o), "--input-field and --output-field are both 'input': every target would be its "
                                         "own input");
    o.classification = true;
    o.text_field = o.label_field = "text";
    CHECK_THROWS_WITH(load_file_task(o), Contains("--text-field and --label-field are both 'text'"));
    // Every prediction of the only label would score 1.
    o.text_field = "text", o.label_field = "label";
    o.train = tmp.file("one.csv", "text,label\ngood,pos\nfine,pos\nok,pos\n");
    o.valid = o.test = o.train;
    CHECK_THROWS_WITH(load_file_task(o), o.train + ": field 'label': the training data has one label, 'pos'; "
                                                   "classification needs at least two");
}

TEST_CASE("classification: one file splits per label, so every label stays in training", "[datasets_files]") {
    testing::TempDir tmp;
    std::string jsonl;
    for (int i = 0; i < 30; ++i) jsonl += "{\"text\": \"common " + std::to_string(i) + "\", \"label\": \"a\"}\n";
    for (int i = 0; i < 2; ++i) jsonl += "{\"text\": \"rare " + std::to_string(i) + "\", \"label\": \"b\"}\n";
    FileTaskOptions o;
    o.classification = true;
    o.train = tmp.file("c.jsonl", jsonl);
    Task t = load_file_task(o);
    CHECK(t.valid.size() == 3);
    CHECK(t.test.size() == 3);
    CHECK(t.train.size() == 26);
    CHECK(std::count_if(t.train.begin(), t.train.end(), [](const Example& e) { return e.target == "b"; }) == 2);
    // The training split keeps file order (so --n-train takes a prefix).
    CHECK(std::is_sorted(t.train.begin(), t.train.end(), [](const Example& x, const Example& y) {
        auto line = [](const Example& e) { return std::stoi(e.origin.substr(e.origin.rfind(':') + 1)); };
        return line(x) < line(y);
    }));
    o.n_train = 25;  // 24 'a' rows, then the first 'b'
    CHECK(load_file_task(o).train.size() == 25);
    o.n_train = 10;
    CHECK_THROWS_WITH(load_file_task(o), Contains("one label, 'a'") && Contains("--n-train 10"));
    o.n_train = 27;
    CHECK_THROWS_WITH(load_file_task(o), Contains("--n-train 27") && Contains("26 training examples"));
    // A file sorted by label: the first rows hold one label, and a later
    // split's other label is explained by --n-train, not only refused.
    std::string sorted;
    for (int i = 0; i < 6; ++i) sorted += "{\"text\": \"t" + std::to_string(i) + "\", \"label\": \"" + (i < 3 ? "a" : "b") + "\"}\n";
    o.train = tmp.file("sorted.jsonl", sorted);
    o.valid = o.test = tmp.file("vt.jsonl", "{\"text\": \"x\", \"label\": \"a\"}\n{\"text\": \"y\", \"label\": \"b\"}\n");
    o.n_train = 3;
    CHECK_THROWS_WITH(load_file_task(o), o.train + ": field 'label': the training data has one label, 'a'; "
                                                   "classification needs at least two (--n-train 3 took the first 3 "
                                                   "rows in file order, all labelled 'a': shuffle the file)");
    // A later split's label that --n-train left out is explained by it, not only refused.
    o.train = tmp.file("sorted3.jsonl", sorted + "{\"text\": \"t6\", \"label\": \"c\"}\n");
    o.valid = o.test = tmp.file("vt2.jsonl", "{\"text\": \"x\", \"label\": \"a\"}\n{\"text\": \"y\", \"label\": \"c\"}\n");
    o.n_train = 4;
    CHECK_THROWS_WITH(load_file_task(o), Contains("vt2.jsonl:2: field 'label': label 'c' never occurs in the training "
                                                  "data (labels: a, b); --n-train 4 took the first 4 training rows in "
                                                  "file order, and the 1 rows labelled 'c' come later: shuffle the file"));
    o.valid = o.test = tmp.path("vt.jsonl");
    o.train = tmp.path("sorted.jsonl");
    o.n_train = 4;
    CHECK(load_file_task(o).labels == std::vector<std::string>{"a", "b"});
}

TEST_CASE("truncation: left counts, right cuts the source, error names the example", "[datasets_files]") {
    // Byte tokens: the framed example takes 1 + |source| + 4 (" => ") + |target| inputs.
    ByteTokenizer tok;
    auto task_of = [](std::vector<Example> train) {
        Task t;
        t.name = "t";
        t.train = std::move(train);
        t.valid = t.test = {Example{"s", "t", {"t"}, {}, "v.csv:2"}};
        t.defaults.max_new_tokens = 0;
        return t;
    };
    const Example long_ex{"abcdefghij", "xyz", {"xyz"}, {}, "f.csv:7"};  // 1 + 10 + 4 + 3 = 18 inputs
    const Example short_ex{"ab", "xyz", {"xyz", "uvwxyz"}, {}, "f.csv:8"};
    const Example huge_target{"a", std::string(20, 'q'), {}, {}, "f.csv:9"};

    Task left = task_of({long_ex, short_ex});
    fit_to_context(left, tok, 12, Truncate::Left);
    CHECK(left.train[0].source == "abcdefghij");  // cut later, from the left, by encode_example
    CHECK(left.report.splits["train"].truncated == 1);
    CHECK(encode_example(left.train[0], tok, 12).tokens.size() == 13);
    CHECK(left.defaults.max_new_tokens == 7);  // longest reference "uvwxyz" + EOS

    Task right = task_of({long_ex, short_ex});
    fit_to_context(right, tok, 12, Truncate::Right);
    CHECK(right.train[0].source == "abcd");  // 1 + 4 + 4 + 3 = 12
    CHECK(right.report.splits["train"].truncated == 1);

    Task utf8 = task_of({Example{"\xC3\xA9\xC3\xA9\xC3\xA9", "x", {"x"}, {}, "u.csv:2"}});
    fit_to_context(utf8, tok, 8, Truncate::Right);  // room 8 - 1 - 4 - 1 = 2 bytes: one character
    CHECK(utf8.train[0].source == "\xC3\xA9");

    Task error = task_of({short_ex, long_ex});
    CHECK_THROWS_WITH(fit_to_context(error, tok, 12, Truncate::Error),
                      Contains("f.csv:7: the example takes 18 tokens framed, more than --seq 12"));

    Task dropped = task_of({huge_target, short_ex});
    fit_to_context(dropped, tok, 12, Truncate::Right);
    CHECK(dropped.train.size() == 1);
    CHECK(dropped.report.splits["train"].dropped_too_long == 1);
    CHECK(dropped.report.splits["train"].examples == 1);  // those kept, not the 2 read
    CHECK(dropped.report.left_out() == 1);
    // The example left out does not set generation's length (its 20-token target once made it 21).
    CHECK(dropped.defaults.max_new_tokens == 7);
    // A target that leaves no room for one source token is left out, not kept with its source cut
    // to nothing: 1 + 4 + 7 = 12 inputs leave 0 for "abc".
    const Example no_room{"abc", "1234567", {"1234567"}, {}, "f.csv:10"};
    Task nothing_left = task_of({no_room, short_ex});
    fit_to_context(nothing_left, tok, 12, Truncate::Right);
    REQUIRE(nothing_left.train.size() == 1);
    CHECK(nothing_left.train[0].source == "ab");
    CHECK(nothing_left.report.splits["train"].dropped_too_long == 1);
    Task no_room_error = task_of({no_room});
    CHECK_THROWS_WITH(fit_to_context(no_room_error, tok, 12, Truncate::Error),
                      Contains("f.csv:10") && Contains("leaves no room for a single source token"));
    Task only_huge = task_of({huge_target});
    CHECK_THROWS_WITH(fit_to_context(only_huge, tok, 12, Truncate::Left), Contains("no train example fits --seq 12"));

    CHECK(parse_truncate("right") == Truncate::Right);
    CHECK_THROWS_WITH(parse_truncate("middle"), Contains("--truncate: 'middle'"));
}

TEST_CASE("the task registry: built-in tasks by name, registered ones alike", "[datasets_files]") {
    const std::vector<std::string> names = task_names();
    for (const char* n : {"e2e", "classify", "reverse", "sort", "add"})
        CHECK(std::find(names.begin(), names.end(), n) != names.end());
    CHECK(task_info("e2e").defaults.max_new_tokens == 40);
    CHECK_THROWS_WITH(task_info("nope"), Contains("unknown task \"nope\""));
    TaskInfo info{"test-echo", "echo the input", TaskDefaults{3, 1, 1, 4, {1e-3}}, [](const TaskRequest& r) {
                      Task t;
                      for (size_t i = 0; i < r.n_train; ++i) t.train.push_back({"w", "w", {"w"}, {}, ""});
                      t.valid = t.test = {{"v", "v", {"v"}, {}, ""}};
                      t.scorer = exact_match_scorer();
                      return t;
                  }};
    if (std::find(names.begin(), names.end(), "test-echo") == names.end()) register_task(info);
    CHECK_THROWS_WITH(register_task(info), Contains("already registered"));
    Task t = make_task("test-echo", 2, 1, 1, 0);
    CHECK(t.name == "test-echo");
    CHECK(t.train.size() == 2);
    CHECK(t.defaults.lr_grid == std::vector<double>{1e-3});
    CHECK(t.score(t.test, {" v "}).value == 1.0);
}
