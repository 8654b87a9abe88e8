#include "datasets/tasks.h"

#include <algorithm>
#include <cctype>
#include <functional>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/rng.h"

namespace peftlab::data {

namespace {

using Slots = std::map<std::string, std::string>;
enum class Split { Train, Valid, Test };

// Independent stream per (seed, purpose). Rng(seed + k) would only be
// Rng(seed) shifted by k draws, so the tag is hashed into a fresh state.
Rng derived_rng(uint64_t seed, uint64_t tag) {
    Rng mix(seed ^ (tag * 0xD1B54A32D192ED03ull));
    return Rng(mix.next_u64());
}

template <class T>
const T& pick(Rng& rng, const std::vector<T>& options) {
    return options[rng.below(uint32_t(options.size()))];
}

bool coin(Rng& rng, float p_true = 0.5f) { return rng.uniform() < p_true; }

// ------------------------------------------------------------- E2E domain

// Slot order of the E2E dataset, used for MRs.
const std::vector<std::string> kSlotOrder = {"name",  "eatType", "food",           "priceRange",
                                             "customer rating", "area", "familyFriendly", "near"};
const std::vector<std::string> kEatTypes = {"restaurant", "pub", "coffee shop"};
const std::vector<std::string> kFoods = {"French", "Italian", "Chinese", "Japanese", "Indian", "English", "Fast food"};
// The original E2E data uses "high" for both price and rating; we say
// "expensive" for price so that every value names exactly one slot.
const std::vector<std::string> kPrices = {"cheap", "moderate", "expensive", "less than £20", "£20-25", "more than £30"};
const std::vector<std::string> kRatings = {"low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"};
const std::vector<std::string> kAreas = {"city centre", "riverside"};
const std::vector<std::string> kFamily = {"yes", "no"};

const std::map<std::string, const std::vector<std::string>*> kSlotValues = {
    {"eatType", &kEatTypes}, {"food", &kFoods},  {"priceRange", &kPrices}, {"customer rating", &kRatings},
    {"area", &kAreas},       {"familyFriendly", &kFamily}};

// Venue names are "<word> <word>" pairs. None of these words is a slot value
// or appears in a phrasing, so the slot matcher cannot confuse them.
const std::vector<std::string> kNameFirst = {"Golden", "Blue",   "Silver", "Green",  "Red",    "Black",
                                             "White",  "Royal",  "Olive",  "Crimson", "Amber", "Jade",
                                             "Copper", "Ivory",  "Scarlet", "Lucky", "Happy",  "Wild",
                                             "Little", "Grand",  "Hidden", "Rusty",  "Velvet", "Twin"};
const std::vector<std::string> kNameSecond = {"Dragon", "Lion",    "Eagle",  "Spice",   "Phoenix", "Rose",
                                              "Bell",   "Anchor",  "Oak",    "Star",    "Fox",     "Lantern",
                                              "Crown",  "Swan",    "Harbour", "Garden", "Kettle",  "Plough",
                                              "Orchid", "Tiger",   "Mill",   "Bridge",  "Wheel",   "Pepper"};

struct NamePools {
    std::vector<std::string> all, train, valid, test;
};

// A fixed (seed-independent) 60/20/20 split of all name pairs: every task
// seed and restaurant_corpus agree on which names are held out.
const NamePools& name_pools() {
    static const NamePools pools = [] {
        NamePools p;
        for (const auto& a : kNameFirst)
            for (const auto& b : kNameSecond) p.all.push_back(a + " " + b);
        auto shuffled = p.all;
        Rng rng(0x5EED0F4A3E5ull);
        for (size_t i = shuffled.size() - 1; i > 0; --i) std::swap(shuffled[i], shuffled[rng.below(uint32_t(i + 1))]);
        size_t n_train = shuffled.size() * 6 / 10, n_valid = shuffled.size() * 2 / 10;
        p.train.assign(shuffled.begin(), shuffled.begin() + n_train);
        p.valid.assign(shuffled.begin() + n_train, shuffled.begin() + n_train + n_valid);
        p.test.assign(shuffled.begin() + n_train + n_valid, shuffled.end());
        return p;
    }();
    return pools;
}

const std::vector<std::string>& names_for(Split split) {
    const auto& p = name_pools();
    return split == Split::Train ? p.train : split == Split::Valid ? p.valid : p.test;
}

// name + n_extra other slots with random values; near differs from name.
Slots random_venue(Rng& rng, const std::vector<std::string>& names, size_t n_extra) {
    Slots mr{{"name", pick(rng, names)}};
    std::vector<std::string> others(kSlotOrder.begin() + 1, kSlotOrder.end());
    for (size_t i = 0; i < n_extra; ++i) {
        size_t j = i + rng.below(uint32_t(others.size() - i));
        std::swap(others[i], others[j]);
        const auto& slot = others[i];
        if (slot == "near") {
            std::string near;
            do near = pick(rng, names);
            while (near == mr["name"]);
            mr[slot] = near;
        } else {
            mr[slot] = pick(rng, *kSlotValues.at(slot));
        }
    }
    return mr;
}

std::string with_article(const std::string& phrase) {
    char c = phrase.empty() ? 'x' : char(std::tolower(static_cast<unsigned char>(phrase[0])));
    bool vowel = std::string_view("aeiou").find(c) != std::string_view::npos;
    return (vowel ? "an " : "a ") + phrase;
}

std::string join_list(const std::vector<std::string>& items) {
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += i + 1 == items.size() ? " and " : ", ";
        out += items[i];
    }
    return out;
}

std::string food_noun(const std::string& food) { return food == "Fast food" ? "fast food" : food + " food"; }
std::string food_adjective(const std::string& food) { return food == "Fast food" ? "fast food" : food; }
bool price_is_word(const std::string& price) { return price == "cheap" || price == "moderate" || price == "expensive"; }

std::string eat_type_noun(Rng& rng, const std::string& eat_type) {
    return eat_type == "coffee shop" && coin(rng, 0.3f) ? "café" : eat_type;
}

// The phrasings. Each slot can appear as a premodifier of the venue noun
// ("a cheap French pub"), a postmodifier ("a pub near Blue Spice") or a verb
// phrase ("serves French food"); an empty string means the slot value has no
// natural phrasing in that role. Every phrasing contains one surface form of
// e2e_lexicon() for its value and no other form.
std::string premodifier(Rng& rng, const std::string& slot, const std::string& v) {
    if (slot == "food") return food_adjective(v);
    if (slot == "priceRange" && (v == "cheap" || v == "expensive")) return v;
    if (slot == "familyFriendly" && v == "yes") return pick(rng, std::vector<std::string>{"family-friendly", "kid friendly"});
    return "";
}

std::string postmodifier(Rng& rng, const std::string& slot, const std::string& v) {
    std::vector<std::string> options;
    if (slot == "food") options = {"serving " + food_noun(v)};
    if (slot == "priceRange") {
        options = {"in the " + v + " price range"};
        options.push_back(price_is_word(v) ? "with " + v + " prices" : "with prices of " + v);
    }
    if (slot == "customer rating")
        options = {"with a " + v + " customer rating", "with a customer rating of " + v, "rated " + v + " by customers"};
    if (slot == "area") {
        if (v == "city centre") options = {"in the city centre", "in the centre of the city"};
        else options = {"in the riverside area", "by the river", "on the riverside"};
    }
    if (slot == "near") options = {"near " + v, "close to " + v};
    if (slot == "familyFriendly") {
        if (v == "yes") options = {"that welcomes families", "that is kid friendly"};
        else options = {"that is not family friendly", "that is adults only"};
    }
    return options.empty() ? "" : pick(rng, options);
}

std::string verb_phrase(Rng& rng, const std::string& slot, const std::string& v) {
    std::vector<std::string> options;
    if (slot == "eatType") options = {"is " + with_article(eat_type_noun(rng, v))};
    if (slot == "food") options = {"serves " + food_noun(v), "offers " + food_noun(v), "has " + food_noun(v)};
    if (slot == "priceRange") {
        options = {"is in the " + v + " price range"};
        if (price_is_word(v)) options.push_back("has " + v + " prices");
        else options.insert(options.end(), {"has prices of " + v, "costs " + v});
    }
    if (slot == "customer rating")
        options = {"has a " + v + " customer rating", "is rated " + v + " by customers",
                   "has a customer rating of " + v};
    if (slot == "area") {
        if (v == "city centre") options = {"is in the city centre", "is located in the centre of the city"};
        else options = {"is in the riverside area", "is located by the river", "is on the riverside"};
    }
    if (slot == "near") options = {"is near " + v, "is located near " + v, "is close to " + v};
    if (slot == "familyFriendly") {
        if (v == "yes") options = {"is family friendly", "is kid friendly", "welcomes families"};
        else options = {"is not family friendly", "is not kid friendly", "is adults only"};
    }
    return pick(rng, options);
}

// One sentence (or two) realizing every slot of mr, in one of several
// structures and with the slots in random order.
std::string realize(const Slots& mr, Rng& rng) {
    const std::string& name = mr.at("name");
    std::vector<std::pair<std::string, std::string>> rest;
    for (const auto& [slot, v] : mr)
        if (slot != "name") rest.emplace_back(slot, v);
    for (size_t i = rest.size(); i > 1; --i) std::swap(rest[i - 1], rest[rng.below(uint32_t(i))]);

    auto verbs_of = [&](const std::vector<std::pair<std::string, std::string>>& slots) {
        std::vector<std::string> vps;
        for (const auto& [slot, v] : slots) vps.push_back(verb_phrase(rng, slot, v));
        return join_list(vps);
    };
    // "a cheap French pub near Blue Spice": puts eatType in the head and up to
    // max_pre / max_post other slots around it; slots it does not place are
    // appended to `left`.
    auto noun_phrase = [&](size_t max_pre, size_t max_post, std::vector<std::pair<std::string, std::string>>& left) {
        std::string head = mr.count("eatType") ? eat_type_noun(rng, mr.at("eatType"))
                                               : pick(rng, std::vector<std::string>{"place", "venue", "spot"});
        // Premodifiers go in the order English wants: "cheap kid friendly French".
        static const std::vector<std::string> pre_order = {"priceRange", "familyFriendly", "food"};
        std::vector<std::pair<size_t, std::string>> pre;
        std::vector<std::string> post;
        for (const auto& [slot, v] : rest) {
            if (slot == "eatType") continue;
            std::string p;
            if (pre.size() < max_pre && coin(rng) && !(p = premodifier(rng, slot, v)).empty()) {
                size_t rank = size_t(std::find(pre_order.begin(), pre_order.end(), slot) - pre_order.begin());
                pre.emplace_back(rank, p);
            } else if (post.size() < max_post && coin(rng, 0.6f) && !(p = postmodifier(rng, slot, v)).empty()) {
                post.push_back(p);
            } else {
                left.emplace_back(slot, v);
            }
        }
        std::sort(pre.begin(), pre.end());
        std::string np;
        for (const auto& [rank, p] : pre) np += p + " ";
        np = with_article(np + head);
        for (const auto& p : post) np += " " + p;
        return np;
    };

    std::vector<std::pair<std::string, std::string>> left;
    auto it_sentence = [&] { return left.empty() ? std::string() : " It " + verbs_of(left) + "."; };
    switch (rng.below(5)) {
        case 0: {  // Blue Spice is a cheap pub near X. It serves French food.
            std::string np = noun_phrase(2, 2, left);
            return name + " is " + np + "." + it_sentence();
        }
        case 1: {  // There is a French pub called Blue Spice in the city centre.
            std::string np = noun_phrase(2, 1, left);
            return "There is " + np + " called " + name + "." + it_sentence();
        }
        case 2: {  // Blue Spice, a French pub, is near X.
            if (!mr.count("eatType")) break;  // "Blue Spice, a place, ..." reads badly
            std::string np = noun_phrase(1, 1, left);
            if (left.empty()) return name + " is " + np + ".";
            return name + ", " + np + ", " + verbs_of(left) + ".";
        }
        case 3: {  // Located in the city centre, Blue Spice serves French food.
            auto loc = std::find_if(rest.begin(), rest.end(),
                                    [](const auto& s) { return s.first == "area" || s.first == "near"; });
            if (loc == rest.end() || rest.size() == 1) break;
            std::string where = postmodifier(rng, loc->first, loc->second);
            std::vector<std::pair<std::string, std::string>> others;
            for (const auto& s : rest)
                if (&s != &*loc) others.push_back(s);
            return "Located " + where + ", " + name + " " + verbs_of(others) + ".";
        }
        default:
            break;
    }
    // Blue Spice serves French food and is near X.
    return name + " " + verbs_of(rest) + ".";
}

Example e2e_example(Rng& rng, Split split) {
    // Redraw until some realization fits the byte budget; then keep up to 3
    // distinct ones that fit. Long MRs with long phrasings are thereby rarer.
    for (;;) {
        Example ex;
        ex.slots = random_venue(rng, names_for(split), 1 + rng.below(3));
        ex.source = format_mr(ex.slots);
        for (int attempt = 0; attempt < 24 && ex.references.size() < 3; ++attempt) {
            std::string s = realize(ex.slots, rng);
            bool fits = ex.source.size() + kSeparator.size() + s.size() <= kE2EMaxBytes;
            if (fits && std::find(ex.references.begin(), ex.references.end(), s) == ex.references.end())
                ex.references.push_back(std::move(s));
        }
        if (ex.references.empty()) continue;
        ex.target = ex.references[0];
        return ex;
    }
}

// ------------------------------------------------------------- sentiment

struct Aspect {
    const char* noun;
    bool plural;
};
const std::vector<Aspect> kAspects = {{"food", false},       {"service", false}, {"staff", true},
                                      {"prices", true},      {"atmosphere", false}, {"coffee", false},
                                      {"desserts", true},    {"music", false}};
const std::vector<std::string> kPositive = {"excellent", "great", "wonderful", "lovely", "superb", "fantastic"};
const std::vector<std::string> kNegative = {"awful", "terrible", "poor", "disappointing", "dreadful", "bad"};

Example sentiment_example(Rng& rng, Split) {
    size_t n_clauses = coin(rng, 0.4f) ? 1 : 3;
    std::vector<size_t> aspects(kAspects.size());
    for (size_t i = 0; i < aspects.size(); ++i) aspects[i] = i;
    for (size_t i = aspects.size(); i > 1; --i) std::swap(aspects[i - 1], aspects[rng.below(uint32_t(i))]);

    std::vector<std::string> clauses;
    std::vector<bool> positive;
    for (size_t c = 0; c < n_clauses; ++c) {
        const Aspect& a = kAspects[aspects[c]];
        bool adj_positive = coin(rng), negated = coin(rng, 0.25f);
        std::string adj = pick(rng, adj_positive ? kPositive : kNegative);
        std::string degree = negated ? "not " : pick(rng, std::vector<std::string>{"", "", "really ", "truly "});
        clauses.push_back(fmt::format("the {} {} {}{}", a.noun, a.plural ? "were" : "was", degree, adj));
        positive.push_back(adj_positive != negated);
    }
    const std::string& name = pick(rng, name_pools().all);
    std::string text = rng.below(2) ? "At " + name + " " + clauses[0] : name + ": " + clauses[0];
    for (size_t c = 1; c < n_clauses; ++c)
        text += (positive[c] == positive[c - 1] ? (c == 1 ? ", " : " and ") : (c == 1 ? ", but " : ", though ")) + clauses[c];
    text += ".";

    size_t n_positive = size_t(std::count(positive.begin(), positive.end(), true));
    Example ex;
    ex.source = std::move(text);
    ex.target = 2 * n_positive > n_clauses ? "positive" : "negative";
    ex.references = {ex.target};
    return ex;
}

// ------------------------------------------------------------- algorithmic

std::string spaced(const std::string& chars) {
    std::string out;
    for (char c : chars) {
        if (!out.empty()) out += ' ';
        out += c;
    }
    return out;
}

Example reverse_example(Rng& rng, Split) {
    static const std::string alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string s(3 + rng.below(8), ' ');
    for (auto& c : s) c = alphabet[rng.below(uint32_t(alphabet.size()))];
    std::string r(s.rbegin(), s.rend());
    return {spaced(s), spaced(r), {spaced(r)}, {}, {}};
}

Example sort_example(Rng& rng, Split) {
    std::string s(3 + rng.below(8), ' ');
    for (auto& c : s) c = char('0' + rng.below(10));
    std::string sorted = s;
    std::sort(sorted.begin(), sorted.end());
    return {spaced(s), spaced(sorted), {spaced(sorted)}, {}, {}};
}

Example add_example(Rng& rng, Split) {
    uint32_t a = rng.below(10000), b = rng.below(10000);
    std::string sum = std::to_string(a + b);
    return {fmt::format("{} + {}", a, b), sum, {sum}, {}, {}};
}

// ------------------------------------------------------------- assembly

using Generator = std::function<Example(Rng&, Split)>;

// Test is drawn first and train last, each from its own stream, so that a
// split never depends on the sizes of the splits drawn after it.
void fill_splits(Task& task, const char* name, const TaskRequest& req, const Generator& gen) {
    std::set<std::string> seen;
    auto draw = [&](std::vector<Example>& out, size_t n, Split split, const char* split_name) {
        Rng rng = derived_rng(req.seed, uint64_t(split) + 1);
        const size_t max_draws = 20 * n + 1000;
        for (size_t d = 0; d < max_draws && out.size() < n; ++d) {
            Example ex = gen(rng, split);
            if (seen.insert(ex.source).second) out.push_back(std::move(ex));
        }
        if (out.size() < n)
            throw std::invalid_argument(
                fmt::format("make_task(\"{}\"): only {} distinct {} examples of the {} requested after {} draws",
                            name, out.size(), split_name, n, max_draws));
    };
    draw(task.test, req.n_test, Split::Test, "test");
    draw(task.valid, req.n_valid, Split::Valid, "valid");
    draw(task.train, req.n_train, Split::Train, "train");
    for (auto [split, examples] : {std::pair{"train", &task.train}, {"valid", &task.valid}, {"test", &task.test}}) {
        DataReport::Split& r = task.report.splits[split];
        r.rows = r.examples = r.pairs = examples->size();
    }
}

Task synthetic_task(const char* name, const TaskRequest& req, const Generator& gen,
                    std::shared_ptr<const Scorer> scorer, std::vector<std::string> labels = {}) {
    Task task;
    task.name = name;
    task.scorer = std::move(scorer);
    task.labels = std::move(labels);
    fill_splits(task, name, req, gen);
    return task;
}

}  // namespace

Task make_e2e_task(const TaskRequest& req) {
    Task t = synthetic_task("e2e", req, e2e_example, generation_scorer(&e2e_lexicon()));
    t.corpus = [](uint64_t seed) { return restaurant_corpus(kDefaultCorpusLines, seed); };
    return t;
}
Task make_classify_task(const TaskRequest& req) {
    std::vector<std::string> labels = {"negative", "positive"};
    return synthetic_task("classify", req, sentiment_example, label_scorer(labels), labels);
}
Task make_reverse_task(const TaskRequest& req) { return synthetic_task("reverse", req, reverse_example, exact_match_scorer()); }
Task make_sort_task(const TaskRequest& req) { return synthetic_task("sort", req, sort_example, exact_match_scorer()); }
Task make_add_task(const TaskRequest& req) { return synthetic_task("add", req, add_example, exact_match_scorer()); }

std::string restaurant_corpus(size_t n_sentences, uint64_t seed) {
    Rng rng = derived_rng(seed, 0xC0);
    std::string out;
    for (size_t i = 0; i < n_sentences; ++i) {
        Slots venue = random_venue(rng, names_for(Split::Train), 1 + rng.below(5));
        // A quarter of the lines are listings in the MR notation, as tables
        // sit in web text, followed by a sentence about some of the listed
        // values only: the base learns the notation and that a listing is
        // talked about, but not the e2e mapping (every value, after " => ").
        if (rng.below(4) == 0) {
            Slots some{{"name", venue.at("name")}};
            for (const auto& [slot, value] : venue)
                if (slot != "name" && rng.below(2) == 0) some[slot] = value;
            out += format_mr(venue) + ' ' + realize(some, rng) + '\n';
            continue;
        }
        out += realize(venue, rng);
        // Half the lines go on about the same venue, repeating its name and
        // some of its values: text where copying from context pays, as in
        // natural text, so the base learns to copy before any fine-tuning.
        if (rng.below(2) == 0) {
            Slots again{{"name", venue.at("name")}};
            for (const auto& [slot, value] : venue)
                if (slot != "name" && rng.below(2) == 0) again[slot] = value;
            out += ' ';
            out += realize(again, rng);
        }
        out += '\n';
    }
    return out;
}

const SlotLexicon& e2e_lexicon() {
    static const SlotLexicon lexicon = [] {
        SlotLexicon lex;
        for (const auto& [slot, values] : kSlotValues)
            for (const auto& v : *values) lex[slot][v] = {v};
        lex["eatType"]["coffee shop"].push_back("café");
        lex["area"]["city centre"].push_back("centre of the city");
        lex["area"]["riverside"].push_back("by the river");
        lex["familyFriendly"]["yes"] = {"family friendly", "family-friendly", "kid friendly", "welcomes families"};
        lex["familyFriendly"]["no"] = {"not family friendly", "not family-friendly", "not kid friendly", "adults only"};
        for (const auto& n : name_pools().all) lex["name"][n] = lex["near"][n] = {n};
        return lex;
    }();
    return lexicon;
}

std::string format_mr(const Slots& slots) {
    std::string out;
    for (const auto& slot : kSlotOrder) {
        auto it = slots.find(slot);
        if (it == slots.end()) continue;
        if (!out.empty()) out += ", ";
        out += slot + "[" + it->second + "]";
    }
    for (const auto& [slot, v] : slots)
        if (std::find(kSlotOrder.begin(), kSlotOrder.end(), slot) == kSlotOrder.end())
            throw std::invalid_argument(fmt::format("format_mr: unknown slot \"{}\"", slot));
    return out;
}

}  // namespace peftlab::data
