#include "peft/multi.h"

#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::peft {

namespace {
// Stacks per-adapter prefixes ([n_a, C] or undefined) into a table
// [A+1, n_max, C] whose rows are zero-padded, with validity [A+1, n_max]
// (the extra last entry, "none", is all invalid). Undefined if no adapter
// gives a prefix.
struct Table {
    Tensor values, valid;
};
Table stack(const std::vector<Tensor>& parts, int64_t C) {
    int64_t n_max = 0;
    for (const Tensor& p : parts)
        if (p.defined()) {
            if (p.ndim() != 2)
                throw std::invalid_argument(fmt::format(
                    "MultiAdapter: adapters must give shared [n, C] prefixes, got {}", shape_str(p.shape())));
            n_max = std::max(n_max, p.dim(0));
        }
    if (n_max == 0) return {};
    const int64_t A = int64_t(parts.size());
    std::vector<Tensor> entries;
    Tensor valid = Tensor::zeros({A + 1, n_max});
    for (int64_t a = 0; a <= A; ++a) {
        const Tensor* p = a < A && parts[size_t(a)].defined() ? &parts[size_t(a)] : nullptr;
        int64_t n = p ? p->dim(0) : 0;
        Tensor e = n == n_max ? *p : n == 0 ? Tensor::zeros({n_max, C}) : concat({*p, Tensor::zeros({n_max - n, C})}, 0);
        entries.push_back(reshape(e, {1, n_max, C}));
        for (int64_t j = 0; j < n; ++j) valid.data()[a * n_max + j] = 1.f;
    }
    return {concat(entries, 0), valid};
}
}  // namespace

MultiAdapter::MultiAdapter(std::vector<Adapter*> adapters) : adapters_(std::move(adapters)) {
    for (size_t i = 0; i < adapters_.size(); ++i) {
        if (!adapters_[i] || !adapters_[i]->base())
            throw std::invalid_argument(fmt::format("MultiAdapter: adapter {} is null or not attached", i));
        if (adapters_[i]->base() != adapters_[0]->base())
            throw std::invalid_argument(fmt::format("MultiAdapter: adapter {} is attached to another base", i));
        if (adapters_[i]->method() == "full")
            throw std::invalid_argument("MultiAdapter: full fine-tuning changes the base and cannot be mixed");
    }
}

void MultiAdapter::set_rows(std::vector<int32_t> rows) {
    for (size_t b = 0; b < rows.size(); ++b)
        if (rows[b] < -1 || rows[b] >= int32_t(adapters_.size()))
            throw std::invalid_argument(fmt::format("MultiAdapter: row {} names adapter {}, but there are {}", b,
                                                    rows[b], adapters_.size()));
    rows_ = std::move(rows);
}

std::vector<int32_t> MultiAdapter::table_rows() const {
    std::vector<int32_t> r = rows_;
    for (auto& v : r)
        if (v < 0) v = int32_t(adapters_.size());
    return r;
}

void MultiAdapter::begin_forward(const ForwardInfo& info) {
    if (int64_t(rows_.size()) != info.B)
        throw std::invalid_argument(
            fmt::format("MultiAdapter: {} row assignments for a batch of {} rows (call set_rows)", rows_.size(), info.B));
    for (Adapter* a : adapters_) a->begin_forward(info);
}

std::vector<int32_t> MultiAdapter::position_offset(const ForwardInfo& info) {
    std::vector<int32_t> out(rows_.size(), -1);
    for (size_t b = 0; b < rows_.size(); ++b) {
        if (rows_[b] < 0) continue;
        std::vector<int32_t> o = adapters_[size_t(rows_[b])]->position_offset(info);
        if (!o.empty()) out[b] = o[0];
    }
    return out;
}

SeqPrefix MultiAdapter::input_prefix(const ForwardInfo& info) {
    std::vector<Tensor> parts;
    const int64_t C = adapters_.empty() ? 0 : adapters_[0]->base()->config().d_model;
    for (Adapter* a : adapters_) parts.push_back(a->input_prefix(info).embeds);
    Table t = stack(parts, C);
    if (!t.values.defined()) return {};
    return {t.values, t.valid, table_rows()};
}

LayerPrefix MultiAdapter::layer_prefix(int layer, const ForwardInfo& info) {
    std::vector<Tensor> hidden, keys, values;
    for (Adapter* a : adapters_) {
        LayerPrefix p = a->layer_prefix(layer, info);
        hidden.push_back(p.hidden);
        keys.push_back(p.key);
        values.push_back(p.value);
    }
    const int64_t C = adapters_.empty() ? 0 : adapters_[0]->base()->config().d_model;
    Table h = stack(hidden, C), k = stack(keys, C), v = stack(values, C);
    if (!h.values.defined() && !k.values.defined()) return {};
    LayerPrefix out;
    out.hidden = h.values;
    out.hidden_valid = h.valid;
    out.key = k.values;
    out.value = v.values;
    out.kv_valid = k.valid;
    out.rows = table_rows();
    return out;
}

Tensor MultiAdapter::linear_delta(const std::string& path, const Tensor& x, const ForwardInfo& info) {
    // Which adapter owns each leading row of x: batch rows normally; table
    // entries (adapter a is entry a, "none" the last) while projecting prefixes.
    const int64_t N = x.dim(0), A = int64_t(adapters_.size());
    std::vector<int32_t> owner(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) owner[size_t(i)] = info.on_prefix ? int32_t(i) : table_rows()[size_t(i)];
    Shape row_shape = x.shape();
    std::vector<Tensor> pieces;
    std::vector<int32_t> order;  // row of x at each position of the concatenated pieces
    bool any = false;
    Shape out_shape;
    for (int64_t a = 0; a <= A; ++a) {
        std::vector<int32_t> idx;
        for (int64_t i = 0; i < N; ++i)
            if (owner[size_t(i)] == a) idx.push_back(int32_t(i));
        if (idx.empty()) continue;
        Tensor d;
        if (a < A && adapters_[size_t(a)]->adapts_linear(path)) {  // else no gather: most adapters leave most Linears
            ForwardInfo sub = info;
            sub.B = int64_t(idx.size());
            d = adapters_[size_t(a)]->linear_delta(path, index_rows(x, idx), sub);
        }
        pieces.push_back(d);
        order.insert(order.end(), idx.begin(), idx.end());
        any = any || d.defined();
    }
    if (!any) return {};
    // The output width comes from the base Linear's weight [out, in].
    const int64_t out_features = adapters_[0]->base()->parameter(path + ".weight").dim(0);
    std::vector<Tensor> full;
    size_t pos = 0;
    for (Tensor& d : pieces) {
        // rows in this piece: count until the next group boundary
        size_t count = 0;
        int32_t o = owner[size_t(order[pos])];
        while (pos + count < order.size() && owner[size_t(order[pos + count])] == o) ++count;
        Shape s = row_shape;
        s[0] = int64_t(count);
        s.back() = out_features;
        if (!d.defined()) d = Tensor::zeros(s);
        else if (d.shape() != s) d = add(Tensor::zeros(s), d);  // broadcast deltas such as a bias [out]
        full.push_back(d);
        pos += count;
    }
    std::vector<int32_t> inverse(order.size());
    for (size_t i = 0; i < order.size(); ++i) inverse[size_t(order[i])] = int32_t(i);
    return index_rows(concat(full, 0), inverse);
}

}  // namespace peftlab::peft
