// The CUDA emulator's runtime interface: what the inline pieces of the emulated CUDA headers (cuda_emu.h, wmma.h)
// call. Implemented in runtime.cpp, which is compiled without sanitizers: its own bookkeeping (fiber switches,
// the values a shuffle moves, the fragments an mma gathers) must not look like memory accesses of the emulated
// threads to ThreadSanitizer or AddressSanitizer. Memory the kernel itself reads or writes (global and shared
// memory, WMMA loads and stores) is accessed by the inline code, compiled with the kernel and its sanitizer.
#pragma once

#include <cuda_runtime_api.h>  // the toolkit's types (dim3, uint3, cudaError_t, cudaFuncAttributes), host-only

#include <cstddef>
#include <cstdint>

namespace linmix::emu {

// The built-in variables of the running emulated thread.
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int lane;  // linear thread index % 32: CUDA forms warps from the linear index x + y Dx + z Dx Dy
  int warp;
  void* fiber;  // the runtime's record of this thread (internal.h)
};

// Set by the scheduler before it resumes a fiber. __thread: no TLS wrapper, so a kernel's read is a plain load.
extern __thread const ThreadCtx* tls_thread;
inline const ThreadCtx& thread_ctx() { return *tls_thread; }

// ---- block and warp synchronisation (call sites name the barrier in error messages)
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };
// The value `bits` (the shuffled variable's bytes) of the lane PTX's shfl.sync rules select; every lane named in
// `mask` must arrive, and the source lane must be in `mask`.
uint64_t shuffle(ShflMode mode, unsigned mask, uint64_t bits, int b, int width, const char* file, int line);

void threadfence();

// ---- shared memory: one arena per block, exactly the launched dynamic size, every variable fenced by redzones
// (canaries checked at block end; poisoned for AddressSanitizer) and filled with 0xff bytes (NaN) at first use.
// `tag` identifies a static declaration (the address of a function-local static: one per instantiation).
void* static_shared(const void* tag, size_t size, size_t align, const char* name);
void* dynamic_shared(size_t align);

// ---- WMMA (16x16x16 only): a warp-wide rendezvous with CUDA's preconditions checked, and the fragment layouts
enum class WmmaOp : int { kLoad = 0, kStore = 1, kMma = 2 };
enum WmmaKind : int {  // fragment use x layout x element type: each has its own random layout per launch
  kWmmaAccF32 = 0,
  kWmmaAF16Row, kWmmaAF16Col, kWmmaBF16Row, kWmmaBF16Col,
  kWmmaABf16Row, kWmmaABf16Col, kWmmaBBf16Row, kWmmaBBf16Col,
  kWmmaKinds
};
enum WmmaElem : int { kElemF32 = 0, kElemF16 = 1, kElemBf16 = 2 };
constexpr int kWmmaSlots = 8;  // elements per lane of a 16x16 fragment (256 / 32)

// The lane's slots of `kind` in this launch: entry i is the matrix position (row * 16 + col) of x[i].
const uint8_t* wmma_positions(int kind);
// Load / store: every lane of the warp arrives with the same pointer, ldm and layout; the pointer is 32-byte
// aligned and ldm a multiple of 16 bytes. Returns after the whole warp arrived; each lane then moves its own slots.
void wmma_memory_op(WmmaOp op, const void* ptr, unsigned ldm, bool row_major, size_t elem_bytes, const char* file,
                    int line);
// d = a b + c over the warp's fragments (fp32 accumulation), once every lane arrived.
struct WmmaMmaArgs {
  const void* a;
  const void* b;
  const float* c;
  float* d;
  int kind_a, kind_b;
  WmmaElem elem;
};
void wmma_mma(const WmmaMmaArgs& args, const char* file, int line);

// ---- launches
using KernelThunk = void (*)(const void* ctx);  // runs the kernel body once, as the current emulated thread
void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, KernelThunk thunk, const void* ctx);

// ---- the runtime API the kernels' launchers use (cuda_emu.h maps the cuda* names here)
cudaError_t get_last_error();
const char* get_error_string(cudaError_t err);
cudaError_t get_device(int* device);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream);

}  // namespace linmix::emu
