// Evaluation: losses on the valid and test splits, and the task's metric on
// greedy generations for the test prompts.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "datasets/batch.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"
#include "nn/dist.h"
#include "nn/generate.h"
#include "nn/trainer.h"

namespace peftlab::harness {

using namespace detail;

// Mean target-token loss over a split (the validation split by default).
double detail::split_loss(Run& r, const std::vector<data::Example>& split, const data::Tokenizer& tok, int64_t batch) {
    NoGradGuard no_grad;
    r.model->eval();
    dist::Communicator& comm = dist::world();
    // The mean over every counted target token of the split, as one batch
    // holding the whole split would give it: each batch's mean loss times its
    // counted targets, summed (batch i on rank i % ranks, then over ranks), over
    // the split's counted targets. A mean of batch means weighted by rows made
    // the number depend on --batch.
    double sums[2] = {0.0, 0.0};  // sum of per-token losses, counted target tokens
    double& total = sums[0];
    double& count = sums[1];
    for (size_t start = 0, i = 0; start < split.size(); start += size_t(batch), ++i) {
        if (int(i % size_t(comm.size())) != comm.rank()) continue;
        std::vector<size_t> idx;
        for (size_t i = start; i < std::min(split.size(), start + size_t(batch)); ++i) idx.push_back(i);
        data::Batch b =
            data::make_conditional_batch(split, idx, tok, int(r.model->config().max_seq), data::PadSide::Right);
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid, b.source_len};
        const double tokens = double(counted_targets(b.targets));  // >= 1 a row: encode_example counts EOS
        total += r.model->loss(in, b.targets).item() * tokens;
        count += tokens;
    }
    comm.all_reduce_sum(sums, 2);
    r.model->train();
    return total / count;
}
double detail::valid_loss(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t batch) {
    return split_loss(r, task.valid, tok, batch);
}

// Generation-based metric on the first n test examples.
void detail::score(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t n, int64_t batch,
           MethodResult& res) {
    NoGradGuard no_grad;
    r.model->eval();
    const int max_new = task.defaults.max_new_tokens;
    const int64_t prompt_budget = r.model->config().max_seq - max_new;
    std::vector<std::string> hyps;
    n = std::min<int64_t>(n, int64_t(task.test.size()));
    // Batch i is generated on rank i % ranks (same batches as one process, so
    // the same outputs); every rank then gathers all of them in order.
    dist::Communicator& comm = dist::world();
    std::vector<std::vector<std::string>> by_batch(size_t((n + batch - 1) / batch));
    for (int64_t start = 0; start < n; start += batch) {
        if (int((start / batch) % comm.size()) != comm.rank()) continue;
        std::vector<std::vector<int32_t>> prompts;
        for (int64_t i = start; i < std::min(n, start + batch); ++i) {
            data::EncodedExample e = data::encode_example(task.test[size_t(i)], tok, int(prompt_budget) + 64);
            std::vector<int32_t> p(e.tokens.begin(), e.tokens.begin() + long(e.target_start));
            if (int64_t(p.size()) > prompt_budget)
                p.erase(p.begin() + 1, p.begin() + 1 + long(int64_t(p.size()) - prompt_budget));
            prompts.push_back(p);
        }
        GenerateOptions go;
        go.max_new_tokens = max_new;
        go.stop_token = tok.eos_id();
        go.pad_token = tok.pad_id();
        for (auto& out : generate(*r.model, prompts, go)) by_batch[size_t(start / batch)].push_back(tok.decode(out));
    }
    for (size_t i = 0; i < by_batch.size(); ++i) {
        const int owner = int(i % size_t(comm.size()));
        if (comm.size() > 1) {
            // CBOR, not JSON text: a decoded generation may be invalid UTF-8 (a
            // byte-level BPE model can stop inside a character), which JSON
            // text cannot carry and CBOR carries byte for byte.
            std::string mine;
            if (comm.rank() == owner) {
                const std::vector<uint8_t> cbor = nlohmann::json::to_cbor(nlohmann::json(by_batch[i]));
                mine.assign(cbor.begin(), cbor.end());
            }
            const std::string got = dist::broadcast_string(comm, mine, owner);
            by_batch[i] = nlohmann::json::from_cbor(std::vector<uint8_t>(got.begin(), got.end()))
                              .get<std::vector<std::string>>();
        }
        hyps.insert(hyps.end(), by_batch[i].begin(), by_batch[i].end());
    }
    r.model->train();
    std::vector<data::Example> ex(task.test.begin(), task.test.begin() + n);
    for (size_t i = 0; i < std::min<size_t>(3, ex.size()); ++i) {
        res.samples.emplace_back(ex[i].source, hyps[i]);
        fmt::print(stderr, "[{} | eval] sample: {}{}{}\n", res.label, ex[i].source, data::kSeparator, hyps[i]);
    }
    res.eval_examples = n;
    // A diverged model still generates something and gets a metric: say why it means nothing.
    if (!std::isfinite(res.final_valid_loss) || !std::isfinite(res.test_loss))
        res.flags.push_back(fmt::format("non-finite loss: valid {}, test {} (diverged weights; the metric is of a "
                                        "broken model)",
                                        res.final_valid_loss, res.test_loss));
    // Degenerate outputs: every generation empty, or all the same.
    const bool all_empty = std::all_of(hyps.begin(), hyps.end(), [](const std::string& h) { return h.empty(); });
    if (hyps.size() > 1 && all_empty)
        res.flags.push_back(fmt::format("empty generations: all {} outputs are empty", hyps.size()));
    else if (hyps.size() > 1 && std::all_of(hyps.begin(), hyps.end(), [&](const std::string& h) { return h == hyps[0]; }))
        res.flags.push_back(fmt::format("constant output: all {} generations are \"{}\"", hyps.size(), hyps[0]));
    res.metric_name = task.metric_name();
    if (ex.empty()) return;
    data::Score sc = task.score(ex, hyps);
    res.metric = sc.value;
    res.extra_metrics = sc.extra;
    // The task's own flag (e.g. a classifier answering one class) says more than "constant output".
    if (sc.flags_one_kind)
        std::erase_if(res.flags, [](const std::string& f) { return f.rfind("constant output", 0) == 0; });
    res.flags.insert(res.flags.end(), sc.flags.begin(), sc.flags.end());
}


std::string unknown_words_flag(const data::Task& task, const data::Tokenizer& tok) {
    if (tok.unk_id() < 0) return "";
    auto unknown = [&](const std::string& text) {
        const std::vector<int32_t> ids = tok.encode(text);
        return std::find(ids.begin(), ids.end(), tok.unk_id()) != ids.end();
    };
    size_t with_unknown = 0;
    for (const data::Example& ex : task.test)
        with_unknown += unknown(ex.source) || std::any_of(ex.references.begin(), ex.references.end(), unknown);
    if (with_unknown == 0) return "";
    return fmt::format("unknown words: {} of {} test examples have words the base's word vocabulary lacks (each "
                       "encodes as one unknown id; the vocabulary keeps the words frequent in the data it was built "
                       "from)",
                       with_unknown, task.test.size());
}

MethodResult evaluate(std::unique_ptr<GPT> model, std::unique_ptr<peft::Adapter> adapter, const data::Tokenizer& tok,
                      const data::Task& task, int64_t eval_examples, int64_t batch, const std::string& label) {
    MethodResult res;
    res.method = adapter ? adapter->method() : "none";
    res.label = label;
    Run r;
    r.model = std::move(model);
    r.adapter = std::move(adapter);
    if (r.adapter) {
        for (auto& [n, t] : r.adapter->parameters()) res.trainable_params += t.numel();
        fmt::print("[{}] {}\n", label, trainable_params_line(*r.adapter, *r.model));
    }
    res.final_valid_loss = valid_loss(r, task, tok, batch);
    res.test_loss = split_loss(r, task.test, tok, batch);
    score(r, task, tok, eval_examples, batch, res);
    return res;
}

}  // namespace peftlab::harness
