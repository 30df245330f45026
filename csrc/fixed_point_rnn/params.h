// fixed_point_rnn: the dense linear RNN as the fixed point of (channel mix with Q_t, diagonal scan).
// Every tensor is contiguous (the torch glue copies otherwise); element offsets are 64-bit.
#pragma once

#include <cstdint>

#include "common/varlen.h"

namespace linmix {

struct FixedPointRnnParams {
  int64_t batch = 0, seqlen = 0, dim = 0, rank = 0;
  int max_iter = 1;
  double tol = 0.0;  // stop an element once its residual < tol; 0 runs exactly max_iter iterations
  // Iteration variants; the defaults are the plain iteration with per-element stopping.
  double damping = 1.0;          // z^l = (1 - damping) z^{l-1} + damping f(z^{l-1}); residual taken before damping
  double batch_quantile = -1.0;  // >= 0: the whole batch stops once this quantile of the residuals < tol
  bool causal = false;           // per-token stopping: token t stops once max_{s<=t} ratio_s < tol
  // inputs, in the activation dtype
  const void* u = nullptr;        // (B, T, D)
  const void* lam = nullptr;      // (B, T, D)
  const void* hh_u = nullptr;     // (B, T, R, D) unit vectors
  const void* hh_beta = nullptr;  // (B, T, R)
  const void* h0 = nullptr;       // (B, D) optional state before token 0 (nullptr: zeros)
  // forward outputs
  void* h = nullptr;        // (B, T, D) activation dtype: the last iterate h^n = f(h^{n-1})
  void* h_prev = nullptr;   // (B, T, D) accumulation dtype: the point the output linearises at, h = f(h_prev)
  int32_t* n_iter = nullptr;  // (B,) iterations run
  float* residual = nullptr;  // (B,) residual of the last iteration
  // backward (h_prev above is an input there)
  const void* dh = nullptr;  // (B, T, D) activation dtype
  void* du = nullptr;        // (B, T, D)
  void* dlam = nullptr;      // (B, T, D)
  void* dhh_u = nullptr;     // (B, T, R, D)
  void* dhh_beta = nullptr;  // (B, T, R)
  void* dh0 = nullptr;       // (B, D) when h0 is given
  // scratch in the accumulation dtype, sized by the launcher (see fixed_point_rnn_*_workspace)
  void* work = nullptr;
  void* flags = nullptr;  // CUDA only: per-batch int32 convergence state and block counters
};

// The params of the CPU kernels and of the fixed_point_rnn_variants CUDA kernels: they also take packed sequences
// (common/varlen.h), which the GPU-verified default kernels do not (a field in FixedPointRnnParams would move their
// later parameters, and change their SASS). batch is then the number of sequences N (h0, dh0, n_iter, residual have
// a row per sequence; each sequence stops on its own), and the (1, T, ...) tensors hold them along T. Null offsets:
// dense.
struct FixedPointRnnVarlenParams : FixedPointRnnParams {
  Varlen varlen;
};

}  // namespace linmix
