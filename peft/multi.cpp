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
        refuse_holding_base(i);
    }
}

void MultiAdapter::refuse_holding_base(size_t i) const {
    const Adapter& a = *adapters_[i];
    if (a.changes_base())
        throw std::invalid_argument(
            fmt::format("MultiAdapter: adapter {} ({}) trains the base itself and cannot be mixed", i, a.method()));
    if (a.merged())
        throw std::invalid_argument(fmt::format(
            "MultiAdapter: adapter {} ({}) is merged into the base, which every other row would then run on; "
            "unmerge it first",
            i, a.method()));
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
    // A merge after construction would change every row's base too.
    for (size_t i = 0; i < adapters_.size(); ++i) refuse_holding_base(i);
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
    std::vector<std::vector<int32_t>> visible_from;
    for (Adapter* a : adapters_) {
        LayerPrefix p = a->layer_prefix(layer, info);
        hidden.push_back(p.hidden);
        keys.push_back(p.key);
        values.push_back(p.value);
        visible_from.push_back(std::move(p.visible_from));
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
    // Each row sees only its own adapter's vectors: that adapter's visible_from
    // for the row (0, every column, for a prefix).
    bool gated = false;
    for (const auto& v : visible_from) gated = gated || !v.empty();
    if (gated) {
        out.visible_from.assign(out.rows.size(), 0);
        for (size_t b = 0; b < out.rows.size(); ++b) {
            const size_t a = size_t(out.rows[b]);
            if (a < visible_from.size() && !visible_from[a].empty()) out.visible_from[b] = visible_from[a].at(b);
        }
    }
    return out;
}

Tensor MultiAdapter::by_rows(const std::string& path, const Tensor& x, const ForwardInfo& info, const RowHook& hook,
                             const Unchanged& unchanged) {
    // Which adapter owns each leading row of x: batch rows normally; table
    // entries (adapter a is entry a, "none" the last) while projecting prefixes.
    const int64_t N = x.dim(0), A = int64_t(adapters_.size());
    const std::vector<int32_t> table = table_rows();
    std::vector<int32_t> owner(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) owner[size_t(i)] = info.on_prefix ? int32_t(i) : table[size_t(i)];
    std::vector<Tensor> pieces;
    std::vector<std::vector<int32_t>> groups;
    bool any = false;
    for (int64_t a = 0; a <= A; ++a) {
        std::vector<int32_t> idx;
        for (int64_t i = 0; i < N; ++i)
            if (owner[size_t(i)] == a) idx.push_back(int32_t(i));
        if (idx.empty()) continue;
        Tensor d;
        if (a < A && adapters_[size_t(a)]->adapts_linear(path)) {  // else no gather: most adapters leave most Linears
            ForwardInfo sub = info;
            sub.B = int64_t(idx.size());
            d = hook(*adapters_[size_t(a)], idx, sub);
        }
        pieces.push_back(d);
        groups.push_back(std::move(idx));
        any = any || d.defined();
    }
    if (!any) return {};
    std::vector<int32_t> order;  // row of x at each position of the concatenated pieces
    for (size_t g = 0; g < pieces.size(); ++g) {
        if (!pieces[g].defined()) pieces[g] = unchanged(groups[g]);
        order.insert(order.end(), groups[g].begin(), groups[g].end());
    }
    std::vector<int32_t> inverse(order.size());
    for (size_t i = 0; i < order.size(); ++i) inverse[size_t(order[i])] = int32_t(i);
    return index_rows(concat(pieces, 0), inverse);
}

Tensor MultiAdapter::linear_delta(const std::string& path, const Tensor& x, const ForwardInfo& info) {
    // Rows without a delta get zeros [rows, ..., out]; the width comes from
    // the base Linear's weight [out, in].
    const int64_t out_features = adapters_.empty() ? 0 : adapters_[0]->base()->parameter(path + ".weight").dim(0);
    auto shape_of = [&](size_t rows) {
        Shape s = x.shape();
        s[0] = int64_t(rows);
        s.back() = out_features;
        return s;
    };
    return by_rows(
        path, x, info,
        [&](Adapter& a, const std::vector<int32_t>& idx, const ForwardInfo& sub) {
            Tensor d = a.linear_delta(path, index_rows(x, idx), sub);
            const Shape s = shape_of(idx.size());
            if (d.defined() && d.shape() != s) d = add(Tensor::zeros(s), d);  // broadcast deltas such as a bias [out]
            return d;
        },
        [&](const std::vector<int32_t>& idx) { return Tensor::zeros(shape_of(idx.size())); });
}

Tensor MultiAdapter::linear_input(const std::string& path, const Tensor& x, const ForwardInfo& info) {
    return by_rows(
        path, x, info,
        [&](Adapter& a, const std::vector<int32_t>& idx, const ForwardInfo& sub) {
            return a.linear_input(path, index_rows(x, idx), sub);
        },
        [&](const std::vector<int32_t>& idx) { return index_rows(x, idx); });
}

Tensor MultiAdapter::linear_output(const std::string& path, const Tensor& x, const Tensor& y, const ForwardInfo& info) {
    return by_rows(
        path, x, info,
        [&](Adapter& a, const std::vector<int32_t>& idx, const ForwardInfo& sub) {
            return a.linear_output(path, index_rows(x, idx), index_rows(y, idx), sub);
        },
        [&](const std::vector<int32_t>& idx) { return index_rows(y, idx); });
}

NormParams MultiAdapter::layer_norm_params(const std::string& path, const ForwardInfo& info) {
    std::vector<NormParams> own;
    bool any = false;
    for (Adapter* a : adapters_) {
        own.push_back(a->layer_norm_params(path, info));
        any = any || own.back().weight.defined() || own.back().bias.defined();
    }
    if (!any) return {};
    const GPT& base = *adapters_[0]->base();
    const Tensor w0 = base.parameter(path + ".weight"), b0 = base.parameter(path + ".bias");
    const int64_t C = w0.dim(0), A = int64_t(adapters_.size());
    std::vector<Tensor> weights, biases;
    for (size_t i = 0; i <= adapters_.size(); ++i) {
        const NormParams p = i < adapters_.size() ? own[i] : NormParams{};
        for (const Tensor* t : {&p.weight, &p.bias})
            if (!p.rows.empty() || (t->defined() && t->shape() != Shape{C}))
                throw std::invalid_argument(fmt::format(
                    "MultiAdapter: adapter {} ({}) must give a shared [{}] gain and bias for {}, got {}{}", i,
                    adapters_[i]->method(), C, path, t->defined() ? shape_str(t->shape()) : "none",
                    p.rows.empty() ? "" : " per row"));
        weights.push_back(reshape(p.weight.defined() ? p.weight : w0, {1, C}));
        biases.push_back(reshape(p.bias.defined() ? p.bias : b0, {1, C}));
    }
    NormParams out{concat(weights, 0), concat(biases, 0), table_rows()};
    if (info.on_prefix) {  // the input's leading rows are the prefix table's A+1 entries
        out.rows.resize(size_t(A + 1));
        for (int32_t a = 0; a <= A; ++a) out.rows[size_t(a)] = a;
    }
    return out;
}

}  // namespace peftlab::peft
