// Times data-parallel training steps of one method on random LM batches, with
// no evaluation: the README's "1 process x 2 threads against 2 ranks x 1
// thread" measurement. Links MPI (Makefile: MPI_BINS); run it directly or
// under mpirun:
//   build/bin/dp_step --method prefix --threads 2
//   mpirun --allow-run-as-root -np 2 build/bin/dp_step --method prefix --threads 1
// Prints, on rank 0, the median ms per update, its compute and all-reduce
// parts (the Trainer's own split), tokens/s over the global batch, and the
// bytes all-reduced per update.
#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <fmt/format.h>

#include "autograd/threads.h"
#include "experiments/lib/flags.h"
#include "mpi/world.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "peft/registry.h"

using namespace peftlab;

int main(int argc, char** argv) {
    mpi::World world(&argc, &argv);
    try {
        cxxopts::Options o("dp_step", "time data-parallel training steps of one method (random LM batches)");
        // clang-format off
        o.add_options()
            ("h,help", "print this help")
            ("method", "PEFT method", cxxopts::value<std::string>()->default_value("prefix"))  // method-names: a default --method overrides
            ("d-model", "d (the harness's medium config: 512)", cxxopts::value<std::string>()->default_value("512"))
            ("layers", "L", cxxopts::value<std::string>()->default_value("8"))
            ("heads", "H", cxxopts::value<std::string>()->default_value("8"))
            ("vocab", "V", cxxopts::value<std::string>()->default_value("2048"))
            ("seq", "T", cxxopts::value<std::string>()->default_value("256"))
            ("batch", "global batch rows", cxxopts::value<std::string>()->default_value("8"))
            ("grad-accum", "micro-batches per rank", cxxopts::value<std::string>()->default_value("1"))
            ("steps", "timed updates (after one warm-up)", cxxopts::value<std::string>()->default_value("5"))
            ("threads", "threads per rank (default: PEFTLAB_THREADS, else the cores / ranks here)", cxxopts::value<std::string>());
        // clang-format on
        const auto r = flags::parse(o, argc, argv);
        flags::configure_threads(r.count("threads") ? std::optional<int64_t>(flags::int_flag(r, "threads", 0))
                                                    : std::nullopt);
        GPTConfig c;
        c.d_model = flags::int_flag(r, "d-model", 1);
        c.n_layers = int(flags::int_flag(r, "layers", 1, std::numeric_limits<int>::max()));
        c.n_heads = int(flags::int_flag(r, "heads", 1, std::numeric_limits<int>::max()));
        c.d_ff = 4 * c.d_model;
        c.vocab = flags::int_flag(r, "vocab", 2);
        c.max_seq = flags::int_flag(r, "seq", 2);
        const int64_t B = flags::int_flag(r, "batch", 1), T = c.max_seq, steps = flags::int_flag(r, "steps", 1);
        GPT model(c, 0);
        auto adapter = peft::make_adapter(r["method"].as<std::string>());
        adapter->activate(model);
        NamedTensors ps(adapter->parameters().begin(), adapter->parameters().end());
        AdamW opt(ps);
        int64_t floats = 0;
        for (auto& [n, t] : ps) floats += t.numel();
        TrainOptions to;
        to.steps = 1;
        to.grad_accum = int(flags::int_flag(r, "grad-accum", 1, std::numeric_limits<int>::max()));
        to.log_every = 0;
        to.tokens_per_step = B * T;
        dist::check_shards(B, world.size() * to.grad_accum, "--batch");

        // Random LM rows (the global batch), this shard's part.
        auto loss_fn = [&](int64_t, Rng& rng, const dist::Shard& shard) -> MicroBatchLoss {
            std::vector<int32_t> tokens(size_t(B * T)), targets(size_t(B * T));
            for (auto& t : tokens) t = int32_t(rng.below(uint32_t(c.vocab)));
            for (auto& t : targets) t = int32_t(rng.below(uint32_t(c.vocab)));
            const int64_t b0 = shard.begin(B), b1 = shard.end(B);
            ModelInput in;
            in.B = b1 - b0, in.T = T;
            in.tokens.assign(tokens.begin() + b0 * T, tokens.begin() + b1 * T);
            const std::vector<int32_t> tg(targets.begin() + b0 * T, targets.begin() + b1 * T);
            return {model.loss(in, tg), int64_t(tg.size())};
        };
        // One update per Trainer run, so that each one's time and all-reduce
        // part are seen; the first is a warm-up.
        std::vector<double> ms, comm;
        for (int64_t i = 0; i <= steps; ++i) {
            Trainer t(ps, opt, loss_fn, to);
            const TrainSummary u = t.run();
            if (i == 0) continue;
            ms.push_back(u.ms_per_step);
            comm.push_back(u.comm_ms_per_step);
        }
        auto median = [](std::vector<double> v) {
            std::sort(v.begin(), v.end());
            return v[v.size() / 2];
        };
        const double m = median(ms), cm = median(comm);
        if (world.rank() == 0)
            fmt::print("dp_step {}: {} rank(s) x {} thread(s), d={} L={} V={} T={} global batch {}, grad_accum {}: "
                       "{:.1f} ms/update (compute {:.1f}, all-reduce {:.1f}; median of {}), {:.0f} tokens/s, "
                       "{} floats = {:.2f} MB all-reduced per update\n",
                       adapter->method(), world.size(), threads(), c.d_model, c.n_layers, c.vocab, T, B, to.grad_accum,
                       m, m - cm, cm, steps, double(B * T) / (m / 1e3), floats, 4.0 * double(floats) / 1e6);
    } catch (const std::exception& e) {
        return world.fail("dp_step", e.what());
    }
    return 0;
}
