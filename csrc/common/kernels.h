// The registry of CUDA kernel families: which kernels each op can run, how far each is verified, and which an op
// uses by default. bench/results/README.md mirrors it row for row (tests/test_kernel_registry.py checks both ways,
// and that the emulator runs every kernel named here). Torch-free.
//
// Tiers: a GPU-verified family passed the test suite and compute-sanitizer on a real GPU at a recorded commit; an
// emulation-verified one passes the suite and the AddressSanitizer / ThreadSanitizer runs under the CUDA emulator
// (csrc/emu/), in CI at every commit. Every op's default path is GPU-verified. Other families run when switched on:
// LINMIX_KERNELS=<name>[,<name>...] or LINMIX_UNVERIFIED_KERNELS=1 (all of them), read at every call. Where no
// GPU-verified family can serve a call at all, an emulation-verified one runs by default and warns once.
#pragma once

namespace linmix {

enum class Tier : int { kGpuVerified = 0, kEmulationVerified = 1, kUnverified = 2 };

enum class KernelFamily : int {
  kLinearScan,
  kLinearScanBwdOneWriter,
  kLinearScanVarlen,
  kSelectiveScan,
  kSelectiveScanFwdWarp,
  kSelectiveScanBwdTiled,
  kSelectiveScanVarlen,
  kSelectiveStateUpdate,
  kChunkGla,
  kGlaFused,
  kFusedRecurrentGla,
  kFusedRecurrentGlaExactDg,
  kGlaHead512,
  kGlaVarlen,
  kFixedPointRnn,
  kFixedPointRnnVariants,
  kCount
};

struct KernelRecord {
  KernelFamily family;
  const char* name;     // the switch name (LINMIX_KERNELS) and the row of bench/results/README.md
  const char* op;
  const char* kernels;  // the family's kernels as Nsight and the emulator name them: fnmatch patterns, "; " between
  Tier tier;
  bool is_default;      // the op's default path for the calls it serves
  const char* what;
};

inline constexpr KernelRecord kKernels[] = {
    {KernelFamily::kLinearScan, "linear_scan", "linear_scan",
     "linmix_linear_scan_fwd_kernel<*>; linmix_linear_scan_bwd_kernel<*, false>", Tier::kGpuVerified, true,
     "block scan over channels of 32, chunked in time"},
    {KernelFamily::kLinearScanBwdOneWriter, "linear_scan_bwd_one_writer", "linear_scan",
     "linmix_linear_scan_bwd_kernel<*, true>", Tier::kEmulationVerified, false,
     "backward with one warp writing dh0 (the default has every warp write the same value)"},
    {KernelFamily::kLinearScanVarlen, "linear_scan_varlen", "linear_scan",
     "linmix_linear_scan_varlen_fwd_kernel<*>; linmix_linear_scan_varlen_bwd_kernel<*>", Tier::kEmulationVerified,
     false, "packed sequences (cu_seqlens): one block per (sequence, 32 channels), the span read from the offsets"},
    {KernelFamily::kSelectiveScan, "selective_scan", "selective_scan",
     "linmix_selective_scan_fwd_kernel<*>; linmix_selective_scan_bwd_kernel<*>", Tier::kGpuVerified, true,
     "one block per (batch, channel), checkpointed state per chunk; variable dB/dC through float atomics"},
    {KernelFamily::kSelectiveScanFwdWarp, "selective_scan_fwd_warp", "selective_scan",
     "linmix_selective_scan_fwd_warp_kernel<*>", Tier::kEmulationVerified, false,
     "forward with one warp per channel, no block barrier"},
    {KernelFamily::kSelectiveScanBwdTiled, "selective_scan_bwd_tiled", "selective_scan",
     "linmix_selective_scan_bwd_tiled_kernel<*>; linmix_selective_scan_bwd_reduce_kernel<*>", Tier::kEmulationVerified,
     false, "atomic-free backward on 16-channel tiles; deterministic=True with variable B/C"},
    {KernelFamily::kSelectiveScanVarlen, "selective_scan_varlen", "selective_scan",
     "linmix_selective_scan_fwd_varlen_kernel<*>; linmix_selective_scan_bwd_varlen_kernel<*>",
     Tier::kEmulationVerified, false,
     "packed sequences (cu_seqlens): the default kernels with one block per (sequence, channel)"},
    {KernelFamily::kSelectiveStateUpdate, "selective_state_update", "selective_state_update",
     "linmix_selective_state_update_fwd_kernel<*>", Tier::kEmulationVerified, false,
     "one decoding step; the default CUDA path is selective_scan's forward at L = 1"},
    {KernelFamily::kChunkGla, "chunk_gla", "chunk_gla",
     "linmix_gla_chunk_fwd_kernel<*>; linmix_gla_chunk_bwd_states_kernel<*>; linmix_gla_chunk_bwd_grads_kernel<*>",
     Tier::kGpuVerified, true, "serial over chunks, WMMA inside a chunk; decays from differences of running sums"},
    {KernelFamily::kGlaFused, "gla_fused", "chunk_gla",
     "linmix_gla_fused_fwd_kernel<*>; linmix_gla_fused_bwd_states_kernel<*>; linmix_gla_fused_bwd_kernel<*>",
     Tier::kEmulationVerified, false,
     "one pass over the chunks per (batch * head, V tile), state on chip; backward: the chunk states, then one "
     "reverse pass per batch * head with the state's gradient on chip (head dims <= 128); exact for any g <= 0"},
    {KernelFamily::kFusedRecurrentGla, "fused_recurrent_gla", "fused_recurrent_gla",
     "linmix_gla_recurrent_fwd_kernel<*>; linmix_gla_recurrent_bwd_dqk_kernel<*, false>; "
     "linmix_gla_recurrent_bwd_dv_kernel<*>",
     Tier::kGpuVerified, true, "one step at a time, state in registers"},
    {KernelFamily::kFusedRecurrentGlaExactDg, "fused_recurrent_gla_exact_dg", "fused_recurrent_gla",
     "linmix_gla_recurrent_bwd_dqk_kernel<*, true>", Tier::kEmulationVerified, false,
     "backward dq, dk with dg exactly 0 where the decay underflows"},
    {KernelFamily::kGlaHead512, "gla_head512", "chunk_gla, fused_recurrent_gla",
     "linmix_gla_head512_chunk_fwd_kernel<*>; linmix_gla_head512_chunk_bwd_states_kernel<*>; "
     "linmix_gla_head512_recurrent_fwd_kernel<*>; linmix_gla_head512_recurrent_bwd_dqk_kernel<*>; "
     "linmix_gla_head512_recurrent_bwd_dv_kernel<*>",
     Tier::kEmulationVerified, false,
     "head dims K or V in (256, 512]: chunk_gla's and fused_recurrent_gla's kernels sized for 512 (the chunk backward "
     "shares chunk_gla's grads kernel, which has no head-dim limit)"},
    {KernelFamily::kGlaVarlen, "gla_varlen", "chunk_gla, fused_recurrent_gla",
     "linmix_gla_varlen_fwd_kernel<*>; linmix_gla_varlen_bwd_dqk_kernel<*>; linmix_gla_varlen_bwd_dv_kernel<*>; "
     "linmix_gla_varlen_head512_fwd_kernel<*>; linmix_gla_varlen_head512_bwd_dqk_kernel<*>; "
     "linmix_gla_varlen_head512_bwd_dv_kernel<*>",
     Tier::kEmulationVerified, false,
     "packed sequences (cu_seqlens): fused_recurrent_gla's kernels (head dims in (256, 512]: gla_head512's sizes) with "
     "a block row per (sequence, head) walking its span of the offsets on the device, for both ops; dg exact as "
     "gla_gate_grad"},
    {KernelFamily::kFixedPointRnn, "fixed_point_rnn", "fixed_point_rnn",
     "linmix_fixed_point_rnn_fwd_*_kernel<*>; linmix_fixed_point_rnn_bwd_*_kernel<*>", Tier::kGpuVerified, true,
     "fixed-point iteration of (Householder mix, diagonal scan) with a device-side convergence test"},
    {KernelFamily::kFixedPointRnnVariants, "fixed_point_rnn_variants", "fixed_point_rnn",
     "linmix_fixed_point_rnn_variants_fwd_*_kernel<*>; linmix_fixed_point_rnn_variants_bwd_*_kernel<*>",
     Tier::kEmulationVerified, false,
     "initial_state, damping and stopping='batch' (a device-side quantile per iteration) / 'causal' (per-token "
     "records); serves the calls the default kernels do not take"},
};
constexpr bool kernel_records_in_order() {
  for (int i = 0; i < static_cast<int>(KernelFamily::kCount); ++i)
    if (static_cast<int>(kKernels[i].family) != i) return false;
  return sizeof(kKernels) / sizeof(kKernels[0]) == static_cast<int>(KernelFamily::kCount);
}
static_assert(kernel_records_in_order(), "one record per family, in the enum's order");

constexpr const KernelRecord& kernel_record(KernelFamily f) { return kKernels[static_cast<int>(f)]; }

// Whether calls that `family` can serve run it: its op's default, or switched on (see above). Read per call.
bool kernel_enabled(KernelFamily family);

// For a call that no GPU-verified family can serve at all: whether `family` may run it, i.e. it is switched on or
// emulation-verified. In the second case `warn` is set on the first such call in this process (the glue warns
// that the kernel has not yet run on a GPU).
bool kernel_serves_uncovered_call(KernelFamily family, bool& warn);

}  // namespace linmix
