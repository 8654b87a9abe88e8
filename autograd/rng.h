#pragma once
// Seeded random numbers that are identical on every machine and compiler.
// std::uniform_*_distribution are implementation-defined, so we derive every
// draw from splitmix64 ourselves.
#include <cmath>
#include <cstdint>

namespace peftlab {

class Rng {
public:
    explicit Rng(uint64_t seed = 0) : state_(seed) {}

    uint64_t next_u64() {
        uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    // Uniform in [0, 1) with 24 random bits (exactly representable in float).
    float uniform() { return float(next_u64() >> 40) * (1.0f / 16777216.0f); }
    float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
    // Uniform integer in [0, n); n > 0. Multiply-shift keeps it bias-free enough
    // for n << 2^32 and, unlike modulo, identical everywhere.
    uint32_t below(uint32_t n) { return uint32_t(((next_u64() >> 32) * uint64_t(n)) >> 32); }
    // Standard normal by Box-Muller, computed in double for reproducibility.
    float normal() {
        double u1 = (double(next_u64() >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
        double u2 = double(next_u64() >> 11) * (1.0 / 9007199254740992.0);
        return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
    float normal(float mean, float std) { return mean + std * normal(); }

    uint64_t state() const { return state_; }
    void set_state(uint64_t s) { state_ = s; }

private:
    uint64_t state_;
};

}  // namespace peftlab
