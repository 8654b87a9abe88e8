#pragma once
// Several adapters on one frozen base, mixed within one batch: batch row b
// uses adapter rows[b] (an index into the list) or none (-1). Every adapter's
// prefix enters as one entry of a table [A+1, n_max, C] (the last entry is the
// empty "none"), so prefix K/V projections run once per adapter, not per row;
// Linear deltas (LoRA, BitFit) run on each adapter's rows only.
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

private:
    // rows_ with -1 mapped to the "none" entry A.
    std::vector<int32_t> table_rows() const;

    std::vector<Adapter*> adapters_;
    std::vector<int32_t> rows_;
};

}  // namespace peftlab::peft
