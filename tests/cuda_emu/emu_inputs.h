// Random inputs shared by the CUDA emulators (tests/cuda_emu/*.cpp).
#pragma once
#include <cmath>
#include <random>
#include <vector>

#include "pymeta/lstm_optimizer.h"

// n draws of N(0, scale^2).
template <typename T>
std::vector<T> emu_random(size_t n, double scale, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(nd(rng) * scale);
  return v;
}

// The 10 weights of the LSTM optimizer (nn.LSTMCell / nn.Linear layouts), N(0, 1/H).
template <typename T>
struct EmuWeights {
  std::vector<T> w[10];
  EmuWeights(int H, int n_in, std::mt19937& rng) {
    const double s = 1.0 / std::sqrt(double(H));
    const size_t sizes[10] = {size_t(4 * H * n_in), size_t(4 * H * H), size_t(4 * H),
                              size_t(4 * H),        size_t(4 * H * H), size_t(4 * H * H),
                              size_t(4 * H),        size_t(4 * H),     size_t(H), 1};
    for (int i = 0; i < 10; ++i) w[i] = emu_random<T>(sizes[i], s, rng);
  }
  pymeta::LstmOptWeights<T> view() const {
    return {w[0].data(), w[1].data(), w[2].data(), w[3].data(), w[4].data(),
            w[5].data(), w[6].data(), w[7].data(), w[8].data(), w[9].data()};
  }
};
