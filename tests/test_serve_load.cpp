// The server under load, small (the full run: make serve-load): every good
// request gets the tokens it gets alone, every bad one its own error, a tenant
// removed while its requests are queued, and the run ends.
#include <catch2/catch.hpp>

#include "experiments/lib/serve_load.h"
#include "nn/gpt.h"
#include "peft/registry.h"
#include "peft/serve.h"

using namespace peftlab;

TEST_CASE("Server under load: good requests exact, bad ones their own error, removal while queued", "[serve][load]") {
    harness::LoadSpec spec;
    spec.tenants = 6;
    spec.requests = 300;
    spec.bad_share = 0.25;
    spec.max_batch = 8;
    spec.wave = 32;
    spec.max_seconds = 60;
    const harness::LoadReport rep = harness::run_serve_load(spec);
    for (const std::string& f : rep.failures) UNSCOPED_INFO(f);
    CHECK(rep.failures.empty());
    CHECK(rep.good + rep.bad == 300);
    CHECK(rep.good_exact == rep.good);
    CHECK(rep.bad_own_error == rep.bad);
    CHECK(rep.bad > 40);
    CHECK(rep.removed_while_queued > 0);
    CHECK(rep.generated_tokens > 0);
}

TEST_CASE("Server::remove_adapter: queued requests refused, running ones finish, name reusable", "[serve]") {
    GPTConfig c;
    c.vocab = 32, c.d_model = 16, c.n_layers = 2, c.n_heads = 2, c.d_ff = 32, c.max_seq = 24;
    GPT base(c, 1);
    peft::AdapterOptions o;
    o.n = 3, o.init = "random";
    auto a = peft::make_adapter("prompt", o), b = peft::make_adapter("lora");
    peft::Server server(base), alone(base);
    server.add_adapter("t0", *a);
    alone.add_adapter("t0", *a);
    const peft::Request running{"running", "t0", {1, 2, 3}, 6, -1}, queued{"queued", "t0", {4, 5}, 3, -1};
    server.submit(running);
    CHECK(server.step().empty());  // admitted, decoding
    server.submit(queued);
    server.remove_adapter("t0");
    CHECK(server.tenants().empty());
    std::vector<peft::Result> out;
    while (!server.idle())
        for (peft::Result& r : server.step()) out.push_back(std::move(r));
    REQUIRE(out.size() == 2);
    const peft::Result& q = out[0].id == "queued" ? out[0] : out[1];
    const peft::Result& r = out[0].id == "queued" ? out[1] : out[0];
    CHECK(q.error == "request 'queued': adapter 't0' was removed");
    CHECK(q.tokens.empty());
    REQUIRE(r.ok());
    CHECK(r.tokens == alone.run({running}).at(0).tokens);  // the running request was not disturbed
    CHECK_THROWS_WITH(server.remove_adapter("t0"), "Server: unknown adapter 't0'");
    server.add_adapter("t0", *b);  // the name is free again
    CHECK(server.tenants() == std::vector<std::string>{"t0"});
    CHECK(server.run({queued}).at(0).ok());
}

TEST_CASE("Load spec: bad fields are refused by name", "[serve][load]") {
    harness::LoadSpec s;
    s.bad_share = 2;
    CHECK_THROWS_WITH(harness::run_serve_load(s), Catch::Contains("bad_share = 2"));
}
