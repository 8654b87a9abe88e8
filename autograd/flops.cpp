#include "autograd/flops.h"

#include <unordered_map>

namespace peftlab::flops {
namespace {
// Regions are interned: id -> full dotted name, (parent id, child name) -> id.
struct State {
    std::vector<std::string> names{""};
    std::unordered_map<std::string, int> ids{{"", 0}};
    std::vector<Counts> counts{Counts{}};
    int region = 0;
    Phase phase = Phase::Forward;
};
State& st() {
    static State s;
    return s;
}
int intern(const std::string& full) {
    State& s = st();
    auto it = s.ids.find(full);
    if (it != s.ids.end()) return it->second;
    int id = int(s.names.size());
    s.names.push_back(full);
    s.ids.emplace(full, id);
    s.counts.push_back(Counts{});
    return id;
}
}  // namespace

const char* phase_name(Phase p) {
    switch (p) {
        case Phase::Forward: return "forward";
        case Phase::BackwardDx: return "backward_dx";
        case Phase::BackwardDw: return "backward_dw";
        case Phase::Optimizer: return "optimizer";
        case Phase::Recompute: return "recompute";
    }
    return "?";
}

void add(uint64_t n) {
    State& s = st();
    s.counts[size_t(s.region)][size_t(s.phase)] += n;
}

void add_grad(bool target_is_leaf, uint64_t n) {
    State& s = st();
    Phase p = target_is_leaf ? Phase::BackwardDw : Phase::BackwardDx;
    s.counts[size_t(s.region)][size_t(p)] += n;
}

Counts totals() {
    Counts t{};
    for (const Counts& c : st().counts)
        for (int i = 0; i < kPhases; ++i) t[size_t(i)] += c[size_t(i)];
    return t;
}

uint64_t sum(const Counts& c) {
    uint64_t total = 0;
    for (uint64_t n : c) total += n;
    return total;
}

std::vector<std::pair<std::string, Counts>> by_region() {
    std::vector<std::pair<std::string, Counts>> out;
    const State& s = st();
    for (size_t i = 0; i < s.names.size(); ++i) {
        const Counts& c = s.counts[i];
        if (c[0] || c[1] || c[2] || c[3]) out.emplace_back(s.names[i], c);
    }
    return out;
}

void reset() {
    for (Counts& c : st().counts) c = Counts{};
}

int current_region() { return st().region; }
Phase current_phase() { return st().phase; }

Region::Region(const std::string& name) : saved_(st().region) {
    const std::string& parent = st().names[size_t(saved_)];
    st().region = intern(parent.empty() ? name : parent + "." + name);
}
Region::~Region() { st().region = saved_; }

Scope::Scope(Phase phase) : Scope(phase, st().region) {}
Scope::Scope(Phase phase, int region_id) : saved_phase_(st().phase), saved_region_(st().region) {
    st().phase = phase;
    st().region = region_id;
}
Scope::~Scope() {
    st().phase = saved_phase_;
    st().region = saved_region_;
}

}  // namespace peftlab::flops
