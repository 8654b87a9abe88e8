#pragma once
// Several adapters on one frozen base, mixed within one batch: batch row b
// uses adapter rows[b] (an index into the list) or none (-1). Every adapter's
// prefix enters as one entry of a table [A+1, n_max, C] (the last entry is the
// empty "none"), so prefix K/V projections run once per adapter, not per row;
// the Linear hooks (delta, input, output: LoRA, BitFit, IA3) run on each
// adapter's rows only, through one row dispatch (by_rows); LayerNorm gains and
// biases enter as a table [A+1, C] gathered per row. An adapter that
// holds the base (changes_base() or merged()) is refused, at construction and
// at every forward.
#include <functional>
#include <vector>

#include "peft/adapter.h"

namespace peftlab::peft {

class MultiAdapter : public ModelHooks {
public:
    // Adapters must be attached to the same base; they stay owned by the caller.
    explicit MultiAdapter(std::vector<Adapter*> adapters);

    // One entry per batch row: adapter index or -1. Checked at each forward.
    void set_rows(std::vector<int32_t> rows);
    const std::vector<int32_t>& rows() const { return rows_; }
    size_t size() const { return adapters_.size(); }

    void begin_forward(const ForwardInfo& info) override;
    SeqPrefix input_prefix(const ForwardInfo& info) override;
    LayerPrefix layer_prefix(int layer, const ForwardInfo& info) override;
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo& info) override;
    // Each row's adapter's convention (-1, keep, for rows without one).
    std::vector<int32_t> position_offset(const ForwardInfo& info) override;
    Tensor linear_input(const std::string& path, const Tensor& x, const ForwardInfo& info) override;
    Tensor linear_output(const std::string& path, const Tensor& x, const Tensor& y, const ForwardInfo& info) override;
    // When some adapter substitutes this LayerNorm's gain or bias: tables
    // [A+1, C] (each adapter's, or the base's where it substitutes none; the
    // last entry, "none", the base's) with each batch row's entry (each table
    // entry's own while projecting prefixes).
    NormParams layer_norm_params(const std::string& path, const ForwardInfo& info) override;

private:
    // A Linear hook on one adapter's rows idx of the batch (sub.B = their count).
    using RowHook = std::function<Tensor(Adapter&, const std::vector<int32_t>& idx, const ForwardInfo& sub)>;
    // What rows idx get from an adapter that changes nothing (zeros for a delta, the rows themselves otherwise).
    using Unchanged = std::function<Tensor(const std::vector<int32_t>& idx)>;
    // Runs `hook` on each adapter's rows of x (leading dim: batch rows, or
    // table entries while projecting prefixes) and puts the results back in
    // row order; undefined when no adapter changes anything.
    Tensor by_rows(const std::string& path, const Tensor& x, const ForwardInfo& info, const RowHook& hook,
                   const Unchanged& unchanged);
    // Throws naming adapter i if it holds the base.
    void refuse_holding_base(size_t i) const;
    // rows_ with -1 mapped to the "none" entry A.
    std::vector<int32_t> table_rows() const;

    std::vector<Adapter*> adapters_;
    std::vector<int32_t> rows_;
};

}  // namespace peftlab::peft
