#pragma once
// Real English text from Princeton WordNet 3.0, as Debian's `wordnet-base`
// package installs it (/usr/share/wordnet/data.{noun,verb,adj,adv}), and the
// tasks built from it: a pretraining corpus of glosses, definition generation
// ("dog (noun)" => its definition, BLEU / ROUGE-L) and gloss -> part of speech
// classification. Nothing is copied into the repository: the files are read
// at run time from the installed package (`make deps` installs it).
//
// File format: wndb(5WN), "WordNet File Formats", section "Data File Format"
// (`man 5WN wndb`, shipped by Debian's `wordnet-base`):
//   synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss
// with ptr = pointer_symbol synset_offset pos source/target and, in data.verb
// only, frames = f_cnt + f_num w_num [+ f_num w_num...]. The license header
// lines begin with two spaces and are skipped.
#include <cstddef>
#include <cstdint>
#include <istream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "datasets/task.h"

namespace peftlab::data::wordnet {

// One word of a synset. `lemma` is as the lexicographer entered it (case
// kept, collocations joined by '_'); an adjective's syntactic marker
// ("(a)", "(p)", "(ip)" in data.adj) is removed from the lemma into `marker`.
struct Word {
    std::string lemma;
    std::string marker;  // "a", "p", "ip" or empty
    int lex_id = 0;      // one hex digit, 0..15
};

// pointer_symbol synset_offset pos source/target; source and target are the
// word numbers (1-based) of a lexical pointer, both 0 for a semantic one.
struct Pointer {
    std::string symbol;      // e.g. "@" hypernym, "!" antonym, "&" similar to
    uint64_t offset = 0;     // target synset's byte offset in data.<pos>
    char pos = 'n';          // n, v, a, s or r
    int source = 0, target = 0;
};

// A generic verb sentence frame (data.verb only): frame f_num applies to word
// w_num of the synset, or to all of its words when w_num is 0.
struct Frame {
    int f_num = 0;
    int w_num = 0;
};

// A gloss split as wndb(5WN) describes it: "a definition, one or more example
// sentences, or both", examples in double quotes. Segments are separated by
// ';' outside double quotes; a segment starting with '"' is an example (the
// quoted text; an attribution after the closing quote, as in
// `"clothed and in his right mind"- Bible`, is dropped), every other segment
// is part of the definition (joined again with "; "). `balanced` is false
// when the gloss has an odd number of '"' (20 glosses of WordNet 3.0 do),
// in which case the split above is a best effort and the tasks leave it out.
struct Gloss {
    std::string definition;
    std::vector<std::string> examples;
    bool balanced = true;
};
Gloss parse_gloss(std::string_view gloss);

struct Synset {
    uint64_t offset = 0;      // synset_offset: this line's byte offset in its data file
    int lex_filenum = 0;      // lexicographer file number, lexnames(5WN)
    char ss_type = 'n';       // n noun, v verb, a adjective, s adjective satellite, r adverb
    std::vector<Word> words;  // w_cnt >= 1 words
    std::vector<Pointer> pointers;
    std::vector<Frame> frames;  // data.verb only
    std::string gloss;          // the raw text after "| ", trailing spaces removed
    Gloss parsed;               // parse_gloss(gloss)
    size_t line = 0;            // 1-based line number in its file, for messages
};

// The longest data line parse_data reads. WordNet 3.0's longest is 12,972
// bytes (a noun synset with many pointers); a file without line ends (a
// binary, a stream of zeros) must not grow one line until memory runs out.
inline constexpr size_t kMaxLineBytes = size_t(1) << 20;

// Parses one data.<pos> file's text. `file` names it in messages and `pos`
// is its category: 'n', 'v', 'a' (accepting ss_type a and s) or 'r'; frames
// are read only for 'v'. Checks every field against the format above: fixed
// widths (8-digit offset, 2-digit lex_filenum, 2-hex-digit w_cnt, 1-hex-digit
// lex_id, 3-digit p_cnt, 4-hex-digit source/target, 2-digit f_cnt and f_num,
// 2-hex-digit w_num), that ss_type matches the file, that w_cnt >= 1, that
// the counts w_cnt, p_cnt and f_cnt fit in the fields the line actually has,
// that "|" follows, and that synset_offset equals the line's byte offset
// (the spec's definition of the field). Throws std::runtime_error
// "<file>:<line>: <what is wrong>" on the first violation (a line longer
// than kMaxLineBytes among them); never reads past the line.
std::vector<Synset> parse_data(std::istream& in, const std::string& file, char pos);

// The four data files of a WordNet database directory.
struct Database {
    std::string dir;
    std::vector<Synset> noun, verb, adj, adv;
    size_t size() const { return noun.size() + verb.size() + adj.size() + adv.size(); }
};

// Where the database is read from: $PEFTLAB_WORDNET_DIR if set and not
// empty, else Debian's /usr/share/wordnet.
std::string default_dir();

// Reads dir/data.noun, data.verb, data.adj and data.adv (an empty `dir`
// means default_dir()). A missing directory or file throws
// std::runtime_error naming the path and saying to run `make deps`
// (package wordnet-base); so does a path that is not a regular file (a
// directory; a FIFO, whose open would wait for a writer; a device), without
// opening it. A malformed line throws as parse_data().
Database load(const std::string& dir = "");

// load(dir), read once per directory and process (the tasks and the corpus
// of one run share it; WordNet 3.0 takes about a second to parse).
const Database& cached(const std::string& dir = "");

// "noun", "verb", "adjective" (ss_type a and s) or "adverb".
std::string pos_name(char ss_type);

// The synset's head word as text: words[0].lemma with '_' as spaces.
std::string head(const Synset& s);

// "dog (noun)": head(s) and pos_name(s.ss_type). The unit of the split.
std::string key(const Synset& s);

// The fixed split every WordNet task and the corpus share: a synset belongs to
// Test when FNV-1a-64(key(s)) % 10 == 0, Valid when it is 1, Train otherwise.
// It does not depend on the seed, so the pretraining corpus (Train only) never
// contains a valid or test key's text, whatever seeds the corpus and the task
// were built with, and all senses of one "lemma (pos)" fall on the same side.
enum class Split { Train, Valid, Test };
Split split_of(const Synset& s);

// Options shared by the tasks: examples are kept short and in common words,
// so that a small model with a 4000-word vocabulary can learn them.
// common_words = 0 turns the vocabulary filter off (every token is common):
// the registered tasks do so for a run whose tokenizer encodes any text
// (TaskRequest::open_vocabulary), and their corpus is then every Train-split
// gloss (94,047 lines, 9.0 MB of WordNet 3.0) instead of 6,737 (0.48 MB).
struct TaskOptions {
    size_t max_definition_bytes = 60;  // definitions longer than this are left out
    size_t common_words = 4000;        // "common" = among this many most frequent gloss tokens; 0: all
};

// What a task builder kept and left out, and why (nothing is dropped silently).
struct TaskReport {
    size_t synsets = 0;                       // synsets read
    std::map<std::string, size_t> filtered;   // reason -> synsets left out
    size_t pool_train = 0, pool_valid = 0, pool_test = 0;  // examples available per split
    size_t lines = 0;                         // corpus only: lines written
    size_t examples_left_out = 0;             // corpus only: example sentences with an uncommon word
    std::string summary() const;              // one line for stderr
};

// Definition generation. source "dog (noun)", target the definition.
// A synset qualifies if its gloss is balanced, its definition is non-empty,
// at most max_definition_bytes long and made of common tokens only, and its
// head is one lower-case ASCII word that is itself common. Synsets sharing a
// key (the senses of one lemma and part of speech) are one valid/test example
// whose references are all their definitions (by ascending offset; target =
// references[0]), since any sense is a correct answer to "bank (noun)"; in
// train every (key, definition) pair is an example. Valid and test are the
// first n keys of their split ordered by FNV-1a-64 of the key (independent of
// the seed); train is a seeded shuffle of the train pairs, first n_train.
// Scored by generation_scorer(): corpus BLEU-4 against all references, and
// ROUGE-L. The task pretrains on pretraining_corpus(); report.notes carries
// TaskReport::summary(). Throws std::invalid_argument naming the split if a
// pool is smaller than asked.
Task make_gloss_task(const Database& db, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
                         const TaskOptions& opt = {}, TaskReport* report = nullptr);

// Part of speech of a gloss. source: the definition (the same filter as above,
// except for the head word); target: one of the label words "noun", "verb",
// "adjective", "adverb" (satellites are adjectives). Each split is stratified:
// n/4 examples per class (the first n % 4 classes one more), valid/test in
// FNV-1a-64 order of "key offset", train a seeded shuffle. Scored by
// label_scorer() (accuracy, macro-F1); pretrains on pretraining_corpus().
// Throws std::invalid_argument naming the split and class if a class's pool
// is too small.
Task make_pos_task(const Database& db, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
                       const TaskOptions& opt = {}, TaskReport* report = nullptr);

// Pretraining text, one line per Train-split synset with a balanced gloss
// whose head word and definition are made of common tokens (as in the tasks,
// so that a small word vocabulary covers every line instead of learning
// "<unk>", the most frequent token of unfiltered glosses):
//   kettle (noun): a pot with a spout for boiling water. "the kettle sang"
// (key, ": ", definition, ".", then each example in double quotes, examples
// with an uncommon word left out), in a seeded shuffle; max_lines = 0 keeps
// them all (6,737 lines, 0.48 MB for WordNet 3.0 with the default options).
// Valid and test keys never occur (split_of). `report` counts the synsets
// left out by reason, the example sentences left out, and the lines.
std::string pretraining_corpus(const Database& db, size_t max_lines, uint64_t seed, const TaskOptions& opt = {},
                               TaskReport* report = nullptr);

}  // namespace peftlab::data::wordnet

namespace peftlab::data {

// The registered tasks "wordnet-gloss" and "wordnet-pos" (datasets/task.cpp):
// wordnet::make_gloss_task / make_pos_task on wordnet::cached() (the
// directory of wordnet::default_dir()) with the default TaskOptions, or with
// common_words = 0 when req.open_vocabulary.
Task make_wordnet_gloss_task(const TaskRequest& req);
Task make_wordnet_pos_task(const TaskRequest& req);

}  // namespace peftlab::data
