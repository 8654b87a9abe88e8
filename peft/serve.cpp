#include "peft/serve.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

namespace {

// RAII: `hooks` on the base for the scope, its previous hooks after.
class HooksScope {
public:
    HooksScope(GPT& base, ModelHooks* hooks) : base_(base), saved_(base.hooks()) { base_.set_hooks(hooks); }
    ~HooksScope() { base_.set_hooks(saved_); }
    HooksScope(const HooksScope&) = delete;
    HooksScope& operator=(const HooksScope&) = delete;

private:
    GPT& base_;
    ModelHooks* saved_;
};

// Drops the leading cache columns that no row attends (left padding of rows
// that have since left), so the attention width follows the rows still
// running rather than everything the batch ever held. Per layer: layers may
// hold prefixes of different lengths.
void drop_dead_columns(KVCache& cache) {
    for (LayerCache& lc : cache.layers) {
        const int64_t B = lc.valid.dim(0), Tk = lc.length;
        int64_t first = Tk;
        for (int64_t b = 0; b < B; ++b) {
            const float* v = lc.valid.data() + b * lc.capacity();
            for (int64_t j = 0; j < first; ++j)
                if (v[j] != 0.f) {
                    first = j;
                    break;
                }
        }
        if (first == 0 || first == Tk) continue;
        lc.drop_front(first);
    }
}

double wall_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

void ServerOptions::validate(const GPTConfig& cfg) const {
    if (max_batch < 1) throw std::invalid_argument(fmt::format("ServerOptions: max_batch = {} must be >= 1", max_batch));
    if (!(max_prefill_padding >= 0.0 && max_prefill_padding <= 1.0))
        throw std::invalid_argument(
            fmt::format("ServerOptions: max_prefill_padding = {} is outside [0, 1]", max_prefill_padding));
    if (pad_token < 0 || pad_token >= cfg.vocab)
        throw std::invalid_argument(
            fmt::format("ServerOptions: pad_token = {} is outside the vocabulary [0, {})", pad_token, cfg.vocab));
}

bool places_prefix_inside_prompt(Adapter& adapter) {
    // A two-column prompt whose source is both columns: any visible_from shows.
    NoGradGuard no_grad;
    const ForwardInfo probe{1, 2, true, false, {2}};
    adapter.begin_forward(probe);
    for (int l = 0; l < adapter.base()->config().n_layers; ++l)
        if (!adapter.layer_prefix(l, probe).visible_from.empty()) return true;
    return false;
}

Server::Server(GPT& base, ServerOptions opts)
    : base_(base), opts_(std::move(opts)), multi_(std::make_unique<MultiAdapter>(std::vector<Adapter*>{})) {
    set_inner(multi_.get());
    opts_.validate(base_.config());
    if (!opts_.clock_ms) opts_.clock_ms = wall_ms;
}

void Server::add_adapter(const std::string& name, Adapter& adapter) { add_tenant(name, adapter, nullptr); }

void Server::load_adapter(const std::string& name, const std::string& dir) {
    std::unique_ptr<Adapter> adapter = peft::load_adapter(dir, base_);
    Adapter& ref = *adapter;
    add_tenant(name, ref, std::move(adapter));
}

void Server::add_tenant(const std::string& name, Adapter& adapter, std::unique_ptr<Adapter> owned) {
    auto refuse = [&](const std::string& why) {
        throw std::invalid_argument(fmt::format("Server: cannot add adapter '{}' ({}): {}", name, adapter.method(), why));
    };
    if (!idle()) refuse("requests are queued or running; add adapters before serving");
    if (name.empty()) refuse("the empty name means the base without adapter");
    if (tenant_index_.count(name)) refuse("the name is taken");
    if (adapter.base() && adapter.base() != &base_) refuse("it is attached to another model");
    if (adapter.changes_base()) refuse("it trains the base itself, which would change the base for every tenant");
    if (adapter.merged())
        refuse("it is merged into the base, which changes the base for every tenant; unmerge it, or serve the merged "
               "model as the base");
    adapter.attach(base_);
    if (opts_.prefix_cache && places_prefix_inside_prompt(adapter))
        refuse("its layer prefixes sit inside the prompt (an infix: LayerPrefix::visible_from), which the prefix "
               "cache cannot hold; serve it with prefix_cache = false");

    auto tenant = std::make_unique<Tenant>();
    tenant->name = name;
    tenant->adapter = &adapter;
    tenant->owned = std::move(owned);
    {
        // The KV cache of a one-token request: per layer, the adapter's prefix
        // columns, then that token's column, which is dropped.
        HooksScope hooks(base_, &adapter);
        EvalScope eval(base_);
        NoGradGuard no_grad;
        ModelInput in;
        in.B = 1;
        in.T = 1;
        in.tokens = {opts_.pad_token};
        KVCache cache;
        base_.forward(in, &cache);
        const int64_t C = base_.config().d_model;
        for (const LayerCache& lc : cache.layers) {
            const int64_t n = lc.length - 1;
            tenant->keys.push_back(n ? reshape(slice(lc.k, 1, 0, n), {n, C}) : Tensor());
            tenant->values.push_back(n ? reshape(slice(lc.v, 1, 0, n), {n, C}) : Tensor());
        }
        tenant->positions = adapter.prefix_positions();
    }
    std::vector<Adapter*> adapters;
    for (auto& t : tenants_) adapters.push_back(t->adapter);
    adapters.push_back(&adapter);
    multi_ = std::make_unique<MultiAdapter>(adapters);  // checks the base and that no adapter holds it
    set_inner(multi_.get());
    tenant_index_[name] = int32_t(tenants_.size());
    tenants_.push_back(std::move(tenant));
}

void Server::remove_adapter(const std::string& name) {
    auto it = tenant_index_.find(name);
    if (it == tenant_index_.end()) throw std::invalid_argument(fmt::format("Server: unknown adapter '{}'", name));
    tenants_[size_t(it->second)]->removed = true;
    tenant_index_.erase(it);
}

std::vector<std::string> Server::tenants() const {
    std::vector<std::string> names;
    for (auto& t : tenants_)
        if (!t->removed) names.push_back(t->name);
    return names;
}

int64_t Server::prefix_cache_bytes() const {
    int64_t bytes = 0;
    for (auto& t : tenants_)
        for (size_t l = 0; l < t->keys.size(); ++l)
            if (t->keys[l].defined()) bytes += 2 * t->keys[l].numel() * int64_t(sizeof(float));
    return bytes;
}

std::pair<Tensor, Tensor> Server::cached_prefix(const std::string& name, int layer) const {
    auto it = tenant_index_.find(name);
    if (it == tenant_index_.end()) throw std::invalid_argument(fmt::format("Server: unknown adapter '{}'", name));
    const Tenant& t = *tenants_[size_t(it->second)];
    if (layer < 0 || layer >= int(t.keys.size()))
        throw std::invalid_argument(fmt::format("Server: layer {} is outside [0, {})", layer, t.keys.size()));
    return {t.keys[size_t(layer)], t.values[size_t(layer)]};
}

uint64_t Server::submit(Request request) {
    queue_.push_back(Queued{std::move(request), next_seq_});
    return next_seq_++;
}

std::string Server::check(const Request& r, int32_t& tenant) const {
    const GPTConfig& cfg = base_.config();
    auto error = [&](const std::string& why) { return fmt::format("request '{}': {}", r.id, why); };
    tenant = -1;
    if (!r.adapter.empty()) {
        auto it = tenant_index_.find(r.adapter);
        if (it == tenant_index_.end()) {
            for (auto& t : tenants_)
                if (t->removed && t->name == r.adapter) return error(fmt::format("adapter '{}' was removed", r.adapter));
            std::string known;
            for (const std::string& t : tenants()) known += (known.empty() ? "" : ", ") + t;
            return error(fmt::format("unknown adapter '{}' (known: {})", r.adapter, known.empty() ? "none" : known));
        }
        tenant = it->second;
    }
    if (r.prompt.empty()) return error("empty prompt");
    for (size_t i = 0; i < r.prompt.size(); ++i)
        if (r.prompt[i] < 0 || r.prompt[i] >= cfg.vocab)
            return error(fmt::format("prompt token {} = {} is outside the vocabulary [0, {})", i, r.prompt[i], cfg.vocab));
    if (r.max_new_tokens < 0) return error(fmt::format("max_new_tokens = {} must be >= 0", r.max_new_tokens));
    if (r.stop_token != -1 && (r.stop_token < 0 || r.stop_token >= cfg.vocab))
        return error(fmt::format("stop_token = {} is outside the vocabulary [0, {}) (-1: none)", r.stop_token, cfg.vocab));
    // The positions the sequence takes (one rule for every method, see
    // serve.h): prompt, continuation, and the prepended vectors that take positions.
    const int64_t positions = tenant < 0 ? 0 : tenants_[size_t(tenant)]->positions;
    const int64_t total = int64_t(r.prompt.size()) + positions + r.max_new_tokens;
    if (total > cfg.max_seq) {
        std::string prefix = positions ? fmt::format(" + {} adapter positions", positions) : "";
        return error(fmt::format("prompt of {} tokens{} + max_new_tokens {} = {} exceeds max_seq = {}",
                                 r.prompt.size(), prefix, r.max_new_tokens, total, cfg.max_seq));
    }
    return {};
}

std::vector<int32_t> Server::row_tenants(const std::vector<Row>& rows) const {
    std::vector<int32_t> t;
    for (const Row& r : rows) t.push_back(r.tenant);
    return t;
}

std::vector<std::vector<Server::Row>> Server::prefill_groups(std::vector<Row> admitted) const {
    // Longest first; a group takes the next prompt while its padding share
    // stays within the budget (its first prompt sets the padded length).
    std::stable_sort(admitted.begin(), admitted.end(), [](const Row& a, const Row& b) {
        return a.request.prompt.size() > b.request.prompt.size();
    });
    std::vector<std::vector<Row>> groups;
    int64_t width = 0, real = 0;
    for (Row& row : admitted) {
        const int64_t len = int64_t(row.request.prompt.size());
        const int64_t rows = groups.empty() ? 0 : int64_t(groups.back().size());
        const int64_t slots = width * (rows + 1);
        if (groups.empty() || double(slots - real - len) > opts_.max_prefill_padding * double(slots)) {
            groups.emplace_back();
            width = len;
            real = 0;
        }
        real += len;
        groups.back().push_back(std::move(row));
    }
    return groups;
}

Tensor Server::prefill_group(const std::vector<Row>& group, DecodeBatch& joined) {
    const int64_t G = int64_t(group.size());
    int64_t T = 0;
    for (const Row& r : group) T = std::max(T, int64_t(r.request.prompt.size()));
    // Real tokens keep positions 0..len-1 wherever their padding puts them.
    ModelInput in;
    in.B = G;
    in.T = T;
    in.tokens.assign(size_t(G * T), opts_.pad_token);
    in.positions.assign(size_t(G * T), 0);
    in.valid.assign(size_t(G * T), 0);
    joined = DecodeBatch{};
    std::vector<int32_t> last_column(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
        const auto& p = group[size_t(g)].request.prompt;
        const int64_t len = int64_t(p.size()), start = opts_.padding == Padding::Left ? T - len : 0;
        for (int64_t i = 0; i < len; ++i) {
            in.tokens[size_t(g * T + start + i)] = p[size_t(i)];
            in.positions[size_t(g * T + start + i)] = int32_t(i);
            in.valid[size_t(g * T + start + i)] = 1;
        }
        in.source_len.push_back(int32_t(start + len));  // the prompt is the source (an infix sits before its last token)
        joined.next_position.push_back(int32_t(len));
        last_column[size_t(g)] = int32_t(start + len - 1);
        stats_.prompt_tokens += len;
    }
    stats_.prefill_slots += G * T;
    forward_tenants_ = row_tenants(group);
    multi_->set_rows(forward_tenants_);
    HooksScope hooks(base_, this);
    EvalScope eval(base_);
    NoGradGuard no_grad;
    Tensor out = base_.forward_at(in, last_column, &joined.cache);  // [G, V]: the head at each row's last token only
    ++stats_.prefills;
    return out;
}

bool Server::emit(Row& row, const float* logits, double now_ms) {
    const int64_t V = base_.config().vocab;
    Rng unused;  // greedy: sample_token draws nothing
    const int32_t token = sample_token(logits, V, 0.f, 0, unused);
    Result& res = row.result;
    res.tokens.push_back(token);
    res.token_ms.push_back(now_ms - row.last_ms);
    row.last_ms = now_ms;
    if (opts_.keep_logits) res.logits.insert(res.logits.end(), logits, logits + V);
    ++stats_.generated_tokens;
    return token == row.request.stop_token || int64_t(res.tokens.size()) >= row.request.max_new_tokens;
}

std::vector<Result> Server::step() {
    std::vector<Result> finished;
    std::vector<Row> group;
    const double admitted = opts_.clock_ms();
    while (!queue_.empty() && int64_t(rows_.size() + group.size()) < opts_.max_batch) {
        Queued q = std::move(queue_.front());
        queue_.pop_front();
        Row row{std::move(q.request), -1, Result{}, admitted};
        row.result.id = row.request.id;
        row.result.adapter = row.request.adapter;
        row.result.seq = q.seq;
        row.result.error = check(row.request, row.tenant);
        if (!row.result.ok() || row.request.max_new_tokens == 0) finished.push_back(std::move(row.result));
        else group.push_back(std::move(row));
    }
    if (group.empty() && rows_.empty()) return finished;
    ++stats_.steps;

    if (!group.empty()) {
        // Every admitted request's first token is stamped when all groups are
        // prefilled: they were admitted together and wait together.
        std::vector<std::vector<Row>> groups = prefill_groups(std::move(group));
        std::vector<DecodeBatch> joined(groups.size());
        std::vector<Tensor> logits;
        for (size_t i = 0; i < groups.size(); ++i) logits.push_back(prefill_group(groups[i], joined[i]));
        const double now = opts_.clock_ms();
        stats_.prefill_s += (now - admitted) / 1e3;
        for (size_t i = 0; i < groups.size(); ++i) {
            std::vector<int32_t> keep;
            for (size_t g = 0; g < groups[i].size(); ++g) {
                if (emit(groups[i][g], logits[i].data() + int64_t(g) * logits[i].dim(1), now))
                    finished.push_back(std::move(groups[i][g].result));
                else
                    keep.push_back(int32_t(g));
            }
            keep_rows(joined[i], keep);
            for (int32_t g : keep) rows_.push_back(std::move(groups[i][size_t(g)]));
            append_rows(batch_, joined[i]);
        }
    }
    if (rows_.empty()) return finished;

    std::vector<int32_t> fed;
    for (const Row& r : rows_) fed.push_back(r.result.tokens.back());
    forward_tenants_ = row_tenants(rows_);
    multi_->set_rows(forward_tenants_);
    const double start = opts_.clock_ms();
    Tensor logits;
    {
        HooksScope hooks(base_, this);
        logits = decode_step(base_, batch_, fed);  // [rows, V]
    }
    const double now = opts_.clock_ms();
    stats_.decode_s += (now - start) / 1e3;
    std::vector<int32_t> keep;
    std::vector<Row> still;
    for (size_t r = 0; r < rows_.size(); ++r) {
        if (emit(rows_[r], logits.data() + int64_t(r) * logits.dim(1), now)) {
            finished.push_back(std::move(rows_[r].result));
        } else {
            keep.push_back(int32_t(r));
            still.push_back(std::move(rows_[r]));
        }
    }
    if (keep.size() != rows_.size()) {
        keep_rows(batch_, keep);
        if (!keep.empty()) drop_dead_columns(batch_.cache);
    }
    rows_ = std::move(still);
    return finished;
}

std::vector<Result> Server::run(std::vector<Request> requests) {
    if (!idle()) throw std::logic_error("Server::run: requests are already queued or running; use step()");
    const uint64_t first = next_seq_;
    for (Request& r : requests) submit(std::move(r));
    std::vector<Result> out(requests.size());
    while (!idle())
        for (Result& r : step()) out[size_t(r.seq - first)] = std::move(r);
    return out;
}

// ---- hooks: the server's forwards ----------------------------------------------------------

SeqPrefix Server::input_prefix(const ForwardInfo& info) {
    // Cached: the soft prompt's keys and values arrive as layer prefixes instead.
    return opts_.prefix_cache ? SeqPrefix{} : ForwardingHooks::input_prefix(info);
}

LayerPrefix Server::layer_prefix(int layer, const ForwardInfo& info) {
    if (!opts_.prefix_cache) return ForwardingHooks::layer_prefix(layer, info);
    // Per-row keys and values [G, w, C], w the longest prefix among the rows;
    // a shorter one is left padded with invalid entries.
    const int64_t G = int64_t(forward_tenants_.size()), C = base_.config().d_model;
    int64_t w = 0;
    for (int32_t t : forward_tenants_)
        if (t >= 0 && tenants_[size_t(t)]->keys[size_t(layer)].defined())
            w = std::max(w, tenants_[size_t(t)]->keys[size_t(layer)].dim(0));
    if (w == 0) return {};
    LayerPrefix p;
    p.key = Tensor::zeros({G, w, C});
    p.value = Tensor::zeros({G, w, C});
    p.kv_valid = Tensor::zeros({G, w});
    for (int64_t g = 0; g < G; ++g) {
        const int32_t t = forward_tenants_[size_t(g)];
        if (t < 0) continue;
        const Tensor& k = tenants_[size_t(t)]->keys[size_t(layer)];
        if (!k.defined()) continue;
        const Tensor& v = tenants_[size_t(t)]->values[size_t(layer)];
        const int64_t n = k.dim(0), pad = w - n;
        std::memcpy(p.key.data() + (g * w + pad) * C, k.data(), size_t(n * C) * sizeof(float));
        std::memcpy(p.value.data() + (g * w + pad) * C, v.data(), size_t(n * C) * sizeof(float));
        std::fill_n(p.kv_valid.data() + g * w + pad, n, 1.f);
    }
    return p;
}

}  // namespace peftlab::peft
