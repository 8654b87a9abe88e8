#pragma once
// Multi-tenant serving: one frozen base, many adapters, requests of different
// tenants decoding together in one batch, with continuous batching and a
// per-tenant prefix cache.
//
// Each step() admits queued requests into free batch rows (a bad request is
// answered with an error and takes no row), prefills the admitted ones
// (together, or in groups of similar prompt length: max_prefill_padding),
// appends them to the running batch (append_rows), feeds every row its last
// token in ONE forward (decode_step) and retires rows that emitted
// their stop token or reached max_new_tokens (keep_rows). Row r of the batch
// serves one request of tenant rows[r] (or of the base alone); a MultiAdapter
// applies each row's own Linear hooks (LoRA, BitFit, IA3).
//
// Sequence length, one rule for every method: a request fits when
//   prompt + max_new_tokens + adapter.prefix_positions() <= max_seq.
// Vectors an adapter prepends (soft prompt, prefixes) take no positions under
// the position convention of nn/hooks.h (positions "keep": real tokens keep
// 0..T-1), so they do not count, as in generate(); an adapter whose virtual
// tokens take positions (HF PEFT's convention, positions "hf": n of them)
// says so through prefix_positions() and they count.
//
// Prefix cache. What an adapter puts before a request (a prompt-tuning soft
// prompt, hidden-state or key/value prefixes) never sees the request: layer
// prefixes are projected without attention, and a soft prompt attends only to
// itself under the causal mask. So the keys and values it leaves in every
// layer are the same for every request of that tenant. The server computes
// them once, when the tenant is added, as the KV cache of a one-token request
// minus that token's column, and hands them to each prefill as per-row
// key/value layer prefixes. A request then pays for its prefix only in
// attention: a soft prompt is not run through the model again, which makes
// prompt tuning at inference exactly "prefix-kv whose K/V are the soft
// prompt's K/V at each layer". With prefix_cache off, every prefill recomputes
// the prefixes through the adapters' hooks (the reference the cache must equal).
//
// Adapters must not change while they are served (the cache is a snapshot),
// and the base must stay as it was when they were added: an adapter that holds
// the base (changes_base(), or merged() such as a merged LoRA) changes it for
// every tenant, so it is refused; serve a merged model as the base alone.
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nn/generate.h"
#include "peft/adapter.h"
#include "peft/multi.h"

namespace peftlab::peft {

struct Request {
    std::string id;       // the caller's, echoed in the result
    std::string adapter;  // tenant name; "" = the base without adapter
    std::vector<int32_t> prompt;
    int max_new_tokens = 16;
    int32_t stop_token = -1;  // ends the request after it is emitted (kept); -1: none
};

struct Result {
    std::string id, adapter;
    uint64_t seq = 0;             // submission order (0, 1, ...), to match results to requests
    std::string error;            // non-empty: the request was refused and nothing was generated
    std::vector<int32_t> tokens;  // greedy continuation, stop token included
    // Per generated token (ServerOptions::clock_ms): ms from admission to the first token (its prefill),
    // then ms since the request's previous token (one decoding step, plus any
    // prefill of joiners run in that step).
    std::vector<double> token_ms;
    std::vector<float> logits;  // [tokens.size(), V], only with ServerOptions::keep_logits
    bool ok() const { return error.empty(); }
};

// Where a prefill group's shorter prompts get their padding slots (invalid,
// never attended). Left: every row's last prompt token in the last column;
// right: prompts start at column 0, padding sits between prompt and continuation.
enum class Padding { Left, Right };

struct ServerOptions {
    int64_t max_batch = 16;  // rows decoding together
    bool prefix_cache = true;
    Padding padding = Padding::Left;
    int32_t pad_token = 0;     // token id in padding slots (must be in the vocabulary)
    bool keep_logits = false;  // store each generated token's logits row in its Result (tests)
    // Requests admitted together are prefilled in one forward padded to the
    // longest prompt, unless more than this share of its positions would be
    // padding: then they are split, by prompt length, into several forwards
    // (prompts of 8 and 32 tokens in one forward compute 24 padding positions).
    double max_prefill_padding = 0.125;
    // The clock latencies and stats are read from, in ms. Default: wall time
    // (steady_clock). A benchmark on a shared machine may pass the process's
    // CPU time, which other processes' load does not inflate.
    std::function<double()> clock_ms;
    // Throws std::invalid_argument naming the option and value.
    void validate(const GPTConfig& cfg) const;
};

// Work done so far, for benchmarks.
struct ServerStats {
    int64_t steps = 0;             // step() calls that ran a forward
    int64_t prefills = 0;          // prefill forwards (one per group of admitted requests)
    int64_t prompt_tokens = 0;     // real prompt tokens prefilled
    int64_t prefill_slots = 0;     // positions the prefill forwards computed: prompt tokens + padding
    int64_t generated_tokens = 0;  // tokens emitted
    double prefill_s = 0.0, decode_s = 0.0;
};

// True if `adapter` (attached to its base) gives layer prefixes that only a
// prompt's later columns see (LayerPrefix::visible_from, an infix): the
// prefix cache, which holds one prefix per tenant for every request, cannot
// serve it (ServerOptions::prefix_cache must be false).
bool places_prefix_inside_prompt(Adapter& adapter);

class Server : private ForwardingHooks {
public:
    // The base is shared, never written to; hooks it carries are restored
    // after each of the server's forwards.
    explicit Server(GPT& base, ServerOptions opts = {});

    // Adds tenant `name` (non-empty, unused) served by `adapter`, attached to
    // this base; the caller keeps it alive. Computes its prefix cache. Only
    // while no request is queued or running.
    void add_adapter(const std::string& name, Adapter& adapter);
    // Same, loading the adapter from a directory written by save_adapter
    // (peft/adapter_io.h); the server owns it.
    void load_adapter(const std::string& name, const std::string& dir);

    // Stops serving tenant `name` (throws std::invalid_argument if it is not
    // served). Any time, also while serving: its queued requests are refused
    // when admitted ("adapter 'name' was removed"), its running rows finish.
    // The name may be added again (while idle, as any add). The tenant's
    // tensors stay allocated until the server is destroyed: the running
    // batch's MultiAdapter keeps pointers into them.
    void remove_adapter(const std::string& name);

    // Queues a request; it is checked when admitted. Returns its seq.
    uint64_t submit(Request request);
    // Admits, prefills and decodes one token for every running row. Returns
    // the requests that finished (or were refused) in this step.
    std::vector<Result> step();
    // Submits all, steps until idle; results in the order of `requests`.
    std::vector<Result> run(std::vector<Request> requests);

    bool idle() const { return queue_.empty() && rows_.empty(); }
    int64_t running() const { return int64_t(rows_.size()); }
    const ServerStats& stats() const { return stats_; }
    void reset_stats() { stats_ = {}; }
    // Tenants served, in the order added.
    std::vector<std::string> tenants() const;
    // Cached keys + values of every tenant and layer, in bytes.
    int64_t prefix_cache_bytes() const;
    // Tenant `name`'s cached keys and values of `layer`, [n, C] each (n may be
    // 0: undefined tensors). Throws naming an unknown tenant.
    std::pair<Tensor, Tensor> cached_prefix(const std::string& name, int layer) const;

private:
    struct Tenant {
        std::string name;
        Adapter* adapter = nullptr;
        std::unique_ptr<Adapter> owned;  // set when the server loaded it
        std::vector<Tensor> keys, values;  // per layer [n_l, C], undefined when n_l = 0
        int64_t positions = 0;  // Adapter::prefix_positions(): positions its prepended vectors take
        bool removed = false;  // remove_adapter: no longer admitted
    };
    struct Queued {
        Request request;
        uint64_t seq;
    };
    struct Row {  // one running request; rows_[r] is batch row r
        Request request;
        int32_t tenant;  // index into tenants_, -1 for the base alone
        Result result;
        double last_ms;  // admission, then each token's time
    };

    void add_tenant(const std::string& name, Adapter& adapter, std::unique_ptr<Adapter> owned);
    // The request's error, or "" if it can be served; sets tenant.
    std::string check(const Request& r, int32_t& tenant) const;
    // Splits admitted rows into prefill groups by prompt length (max_prefill_padding).
    std::vector<std::vector<Row>> prefill_groups(std::vector<Row> admitted) const;
    // Prefills `group` into `joined`; returns logits [G, V] at each row's last prompt token.
    Tensor prefill_group(const std::vector<Row>& group, DecodeBatch& joined);
    // Appends token t (with its logits row) to `row`; true when the request is done.
    bool emit(Row& row, const float* logits, double now_ms);
    std::vector<int32_t> row_tenants(const std::vector<Row>& rows) const;

    // The server's forwards run with itself as the base's hooks: every hook
    // goes to the MultiAdapter (ForwardingHooks), except the prefixes, which
    // come from the prefix cache when it is on.
    SeqPrefix input_prefix(const ForwardInfo& info) override;
    LayerPrefix layer_prefix(int layer, const ForwardInfo& info) override;

    GPT& base_;
    ServerOptions opts_;
    std::vector<std::unique_ptr<Tenant>> tenants_;
    std::map<std::string, int32_t> tenant_index_;
    std::unique_ptr<MultiAdapter> multi_;  // over tenants_, rebuilt when one is added
    std::deque<Queued> queue_;
    uint64_t next_seq_ = 0;
    std::vector<Row> rows_;
    DecodeBatch batch_;
    std::vector<int32_t> forward_tenants_;  // tenant per row of the forward being run
    ServerStats stats_;
};

}  // namespace peftlab::peft
