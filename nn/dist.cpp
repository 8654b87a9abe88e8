#include "nn/dist.h"

#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::dist {

namespace {
SingleProcess g_single;
Communicator* g_world = &g_single;
}  // namespace

Communicator& world() { return *g_world; }
void set_world(Communicator* comm) { g_world = comm ? comm : &g_single; }

std::string broadcast_string(Communicator& comm, std::string s, int root) {
    uint64_t n = s.size();
    comm.broadcast(&n, sizeof n, root);
    s.resize(size_t(n));
    if (n) comm.broadcast(s.data(), size_t(n), root);
    return s;
}

void check_shards(int64_t batch, int count, const char* what) {
    if (count < 1) throw std::invalid_argument(fmt::format("{}: {} micro-batches per update (must be >= 1)", what, count));
    if (batch < count)
        throw std::invalid_argument(fmt::format(
            "{}: global batch {} cannot be split into {} micro-batches (ranks x --grad-accum); each needs a row",
            what, batch, count));
}

}  // namespace peftlab::dist
