// The CUDA emulator's runtime state, shared by its parts: scheduler.cpp (launches, blocks, the thread scheduler,
// the runtime API), collectives.cpp (barriers, shuffles, WMMA), arena.cpp (shared memory). Never compiled with a
// sanitizer (fiber.h says why).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "emu/fiber.h"
#include "emu/runtime.h"

namespace linmix::emu {

// ---- configuration, read at every launch (linmix.emulation documents the variables)
enum class Schedule { kForward, kReverse, kShuffle };

struct Config {
  Schedule schedule = Schedule::kShuffle;
  uint64_t seed = 0;  // this launch's
  int workers = 2;
  int arch = 80;  // whose launch limits apply: sm_80's (the stricter of the two we build) or sm_90's
};

uint64_t process_seed();
constexpr size_t kDefaultSmem = 48 * 1024;
inline size_t max_block_smem(int arch) { return arch >= 90 ? 227 * 1024 : 163 * 1024; }

// ---- what the runtime knows of a kernel
struct KernelInfo {
  std::string name;           // e.g. linmix_gla_fused_fwd_kernel<linmix::GlaFusedTraits<64>, float>
  int max_dynamic_smem = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize; -1: the default, 48 KiB - static
  size_t static_smem = 0;     // the most any block of it declared
};
std::mutex& kernels_mutex();  // guards every KernelInfo

// ---- threads, blocks, launches
enum class State : uint8_t { kRunnable, kBarrier, kWarp, kExited };
enum class WarpOp : uint8_t { kSyncwarp, kShuffle, kWmmaLoad, kWmmaStore, kWmmaMma };
const char* warp_op_name(WarpOp op, ShflMode mode);

struct Worker;

// One emulated CUDA thread.
struct Fiber {
  Worker* worker = nullptr;  // the OS thread's emulation state that runs its block
  Context ctx;
  FiberSide side;
  ThreadCtx tc{};
  int tid = 0;  // linear index in the block
  State state = State::kRunnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  uint64_t barrier_gen = 0;
  // the warp collective it waits at
  WarpOp op = WarpOp::kSyncwarp;
  ShflMode mode = ShflMode::kIdx;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  int b = 0, width = 32;
  const void* ptr = nullptr;
  unsigned ldm = 0;
  bool row = false;
  const WmmaMmaArgs* mma = nullptr;
  uint64_t warp_gen = 0;  // the __syncwarp generation of its warp it arrived in
};

struct Launch {
  const void* kernel = nullptr;
  KernelInfo* info = nullptr;
  Config cfg;
  dim3 grid, block;
  size_t dyn_smem = 0;
  KernelThunk thunk = nullptr;
  const void* ctx = nullptr;
  int threads = 0;
  uint64_t n_blocks = 0;
  uint64_t order_mul = 1, order_add = 0;  // block i of the run order is (order_mul i + order_add) mod n_blocks
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  uint8_t wmma_pos[kWmmaKinds][32][kWmmaSlots];  // this launch's fragment layouts (wmma.h)
  int sync_in = 0, sync_out = 0;  // ThreadSanitizer: the host's work before the launch, the launch's after it

  void record_error(const std::string& what) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!failed.exchange(true)) error = what;
  }
};

// Shared memory of the block in flight: the dynamic region (exactly the launched size) first, then the static
// variables in order of first use, every region between redzones (a canary, checked at barriers and the block's
// end; poisoned for AddressSanitizer) and filled with 0xff bytes (NaN) when it appears. Under ThreadSanitizer the
// memory is mapped fresh for every block, so the previous block's accesses are forgotten (they are no race).
class Arena {
 public:
  static constexpr size_t kCapacity = 2 << 20;
  static constexpr size_t kRedzone = 128;
  static constexpr size_t kDynOffset = 1024;

  Arena();
  ~Arena();
  void begin_block(size_t dyn);
  void end_block();
  unsigned char* dynamic_base() { return mem_ + kDynOffset; }
  const unsigned char* base() const { return mem_; }  // kCapacity bytes
  size_t dynamic_bytes() const { return dyn_; }
  size_t static_bytes() const { return static_bytes_; }
  // The slot of the declaration `tag`, added on first use; nullptr when the arena is full.
  unsigned char* find_or_add_static(const void* tag, size_t size, size_t align, bool& added);
  // The first redzone whose canary changed, described: a write out of some region's bounds. Empty if intact.
  std::string check_redzones() const;

 private:
  struct Static {
    const void* tag;
    size_t offset, size;
  };
  void map();
  void unmap();
  void fill(size_t off, size_t n, unsigned char v);
  void add_redzone(size_t off);
  std::string describe_overrun(size_t redzone, size_t i) const;

  unsigned char* mem_ = nullptr;
  size_t dyn_ = 0, cursor_ = 0, static_bytes_ = 0;
  std::vector<Static> statics_;
  std::vector<size_t> redzones_;
};

// Lanes of one warp waiting at one collective (same op, same mask).
struct WarpGroup {
  WarpOp op;
  unsigned mask;
  int arrived, expected;
};

// One block in flight on a worker.
struct Block {
  Launch* launch = nullptr;
  uint3 idx{};
  std::vector<Fiber> fibers;
  std::vector<int> order;  // this round's order of the threads
  int pos = 0;             // the next index of `order` this round
  std::vector<std::vector<WarpGroup>> pending;  // per warp: its collectives waiting for lanes
  uint64_t rng = 0;        // xorshift state for the shuffled schedule
  int n_exited = 0;
  uint64_t barrier_gen = 0;
  std::vector<uint64_t> syncwarp_gen;  // per warp: __syncwarp groups completed
  // ThreadSanitizer sync objects of this block: barrier generations (2), and per warp 2 for __syncwarp. Fresh
  // memory per block, freed after it, so no edge leaks from one block into the next.
  std::unique_ptr<char[]> sync;
  const void* barrier_sync(uint64_t gen) const { return sync.get() + (gen & 1); }
  const void* warp_sync(int warp, uint64_t gen) const { return sync.get() + 2 + 2 * warp + (gen & 1); }

  // The next runnable thread of this round, or nullptr at its end.
  Fiber* next_runnable() {
    while (pos < static_cast<int>(order.size())) {
      Fiber& f = fibers[order[pos++]];
      if (f.state == State::kRunnable) return &f;
    }
    return nullptr;
  }
};

// One OS thread's emulation state: its fiber stacks, its arena, the block it runs.
struct Worker {
  Context sched_ctx;
  FiberSide sched_side;
  StackPool stacks;
  Arena arena;
  Block block;

  Worker();
  void run(Launch& L);  // blocks of L until none is left
  void run_block(Launch& L, uint3 idx, uint64_t linear);
  void schedule(Launch& L, Block& B);
  void resolve_stall(Launch& L, Block& B);
  void resume(Fiber& f);
  // In fiber context: hand over to the next runnable thread of the round (or, at its end, the scheduler) until
  // this fiber is runnable again; or for good. A direct switch between fibers halves the switches per barrier.
  void yield(Fiber& f);
  [[noreturn]] void finish(Fiber& f);

 private:
  void hand_over(Fiber& f, bool finishing);
};

Worker& this_worker();  // the calling OS thread's (created on first use)

// In fiber context: the running fiber (its worker: self().worker).
inline Fiber& self() { return *static_cast<Fiber*>(tls_thread->fiber); }

// Global-memory traffic (traffic.cpp; no-ops outside the traffic build): a launch begins on its launching thread,
// a block on its worker (whose stacks, arena and fibers are not global memory), a worker is done with the launch,
// the launch ends (its counts become a record).
void traffic_launch_begin();
void traffic_block_begin(Worker& w);
void traffic_worker_done();
void traffic_launch_end(const Launch& L);

// Ends the calling fiber's launch with an error naming kernel, block, thread, seed and schedule; never returns.
[[noreturn]] void fault(const std::string& what);
// "linmix CUDA emulator: <kernel> block (x, y, z) [thread (x, y, z)] [seed, schedule]: "
std::string describe(const Launch& L, const Block& B, const Fiber* f);
std::string site(const Fiber& f);  // the file:line a fiber waits at
std::string hex(unsigned mask);
std::string idx_str(uint3 v);

}  // namespace linmix::emu
