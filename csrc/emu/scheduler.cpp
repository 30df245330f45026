// Launches for the CUDA emulator (runtime.h's launch and runtime API): the block scheduler and the worker pool.
//
// A launch runs its blocks in a random order, on LINMIX_EMU_WORKERS worker threads at once. A block runs its
// threads as fibers on one worker: each runs until it reaches a barrier or a warp collective or exits; the order in
// which runnable threads go is LINMIX_EMU_SCHEDULE (forward, reverse, or shuffle: a fresh random order every round).
// A __syncthreads completes when every thread of the block waits at it (collectives.cpp completes warp
// collectives). When no thread can run, the barrier is released or the state is reported as the error it is (a
// barrier not every thread reaches, a lane that never arrives). Errors end the launch and surface through
// cudaGetLastError, naming the kernel, block, thread, seed and schedule.
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <random>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "emu/internal.h"

namespace linmix::emu {

__thread const ThreadCtx* tls_thread = nullptr;

namespace {

// ---------------------------------------------------------------- configuration
const char* schedule_name(Schedule s) {
  return s == Schedule::kForward ? "forward" : s == Schedule::kReverse ? "reverse" : "shuffle";
}

int read_arch() {
  const char* s = std::getenv("LINMIX_EMU_ARCH");
  return s != nullptr && std::atoi(s) >= 90 ? 90 : 80;
}

Config read_config() {
  Config c;
  if (const char* s = std::getenv("LINMIX_EMU_SCHEDULE")) {
    const std::string v(s);
    if (v == "forward") {
      c.schedule = Schedule::kForward;
    } else if (v == "reverse") {
      c.schedule = Schedule::kReverse;
    } else if (v != "shuffle" && !v.empty()) {
      std::fprintf(stderr, "linmix CUDA emulator: LINMIX_EMU_SCHEDULE must be forward, reverse or shuffle, not %s\n",
                   s);
      std::abort();
    }
  }
  if (const char* s = std::getenv("LINMIX_EMU_WORKERS")) c.workers = std::max(1, std::atoi(s));
  c.arch = read_arch();
  static std::atomic<uint64_t> launches{0};
  c.seed = process_seed() + 0x9e3779b97f4a7c15ull * (launches.fetch_add(1) + 1);
  return c;
}

// ---------------------------------------------------------------- kernels: names, attributes, what ran
std::map<const void*, KernelInfo>& kernels() {
  static std::map<const void*, KernelInfo> k;
  return k;
}
std::set<std::string>& kernels_run() {
  static std::set<std::string> s;
  return s;
}

// "void linmix::name<T>(Params, ...)" -> "name<T>", from the kernel's symbol (kernels are exported, CMakeLists.txt)
std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) return "<unnamed kernel>";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : info.dli_sname;
  std::free(d);
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;
  for (size_t i = s.size(); i-- > 0;) {
    if (s[i] == ')') ++depth;
    if (s[i] == '(' && --depth == 0) {
      s = s.substr(0, i);
      break;
    }
  }
  if (s.rfind("linmix::", 0) == 0) s = s.substr(8);
  return s;
}

KernelInfo& kernel_info_locked(const void* kernel) {
  auto [it, fresh] = kernels().try_emplace(kernel);
  if (fresh) it->second.name = kernel_name(kernel);
  return it->second;
}

// ---------------------------------------------------------------- errors (per host thread, as CUDA's)
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

void set_error(cudaError_t err, const std::string& message) {
  t_last_error = err;
  t_last_message = message;
}

thread_local std::unique_ptr<Worker> t_worker;

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Worker& w = *f.worker;
  fiber_entered(f.side, w.sched_side);
  Launch& L = *w.block.launch;
  hb_acquire(&L.sync_in);
  try {
    L.thunk(L.ctx);
  } catch (const std::exception& e) {
    fault(std::string("the kernel threw: ") + e.what());
  }
  hb_release(&L.sync_out);
  f.state = State::kExited;
  ++w.block.n_exited;
  w.finish(f);
}

// The message for a warp collective that cannot complete: the first lane its mask names that is elsewhere.
std::string missing_lane(const Block& B, const Fiber& f) {
  const std::string what = std::string(warp_op_name(f.op, f.mode)) + " at " + site(f) + " with mask " + hex(f.mask);
  for (int l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    const Fiber& g = B.fibers[f.tc.warp * 32 + l];
    if (g.state == State::kWarp && g.op == f.op && g.mask == f.mask) continue;
    const std::string why = g.state == State::kExited    ? "it exited"
                            : g.state == State::kBarrier ? "it waits at __syncthreads at " + site(g)
                                                         : "it waits at " + std::string(warp_op_name(g.op, g.mode)) +
                                                               " at " + site(g) + " with mask " + hex(g.mask);
    return what + ": lane " + std::to_string(l) + " named in the mask never arrives (" + why + ")";
  }
  return what + ": never completes";
}

}  // namespace

// ---------------------------------------------------------------- internal.h
uint64_t process_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("LINMIX_EMU_SEED")) return std::strtoull(s, nullptr, 0);
    return uint64_t(std::random_device{}()) << 32 ^ std::random_device{}();
  }();
  return seed;
}

std::mutex& kernels_mutex() {
  static std::mutex m;
  return m;
}

const char* warp_op_name(WarpOp op, ShflMode mode) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kWmmaLoad: return "wmma::load_matrix_sync";
    case WarpOp::kWmmaStore: return "wmma::store_matrix_sync";
    case WarpOp::kWmmaMma: return "wmma::mma_sync";
    case WarpOp::kShuffle: break;
  }
  switch (mode) {
    case ShflMode::kIdx: return "__shfl_sync";
    case ShflMode::kUp: return "__shfl_up_sync";
    case ShflMode::kDown: return "__shfl_down_sync";
    case ShflMode::kBfly: return "__shfl_xor_sync";
  }
  return "?";
}

Worker& this_worker() {
  if (!t_worker) t_worker = std::make_unique<Worker>();
  return *t_worker;
}

void fault(const std::string& what) {
  Fiber& f = self();
  Worker& w = *f.worker;
  w.block.launch->record_error(describe(*w.block.launch, w.block, &f) + what);
  f.state = State::kExited;
  w.finish(f);
}

std::string site(const Fiber& f) {
  std::string file = f.file ? f.file : "?";
  const size_t slash = file.find("csrc/");
  if (slash != std::string::npos) file = file.substr(slash + 5);
  return file + ":" + std::to_string(f.line);
}

std::string hex(unsigned mask) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

std::string idx_str(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string describe(const Launch& L, const Block& B, const Fiber* f) {
  std::string s = "linmix CUDA emulator: " + L.info->name + " block " + idx_str(B.idx);
  if (f != nullptr) s += " thread " + idx_str(f->tc.thread_idx);
  return s + " [LINMIX_EMU_SEED=" + std::to_string(process_seed()) + ", schedule " + schedule_name(L.cfg.schedule) +
         "]: ";
}

// ---------------------------------------------------------------- the worker: blocks and their threads
Worker::Worker() { fiber_side_native(sched_side); }

void Worker::run(Launch& L) {
  for (;;) {
    if (L.failed.load()) return traffic_worker_done();
    const uint64_t i = L.next.fetch_add(1);
    if (i >= L.n_blocks) return traffic_worker_done();
    const uint64_t lin = (L.order_mul * i + L.order_add) % L.n_blocks;
    run_block(L,
              uint3{static_cast<unsigned>(lin % L.grid.x), static_cast<unsigned>(lin / L.grid.x % L.grid.y),
                    static_cast<unsigned>(lin / (uint64_t(L.grid.x) * L.grid.y))},
              lin);
  }
}

void Worker::run_block(Launch& L, uint3 idx, uint64_t linear) {
  Block& B = block;
  B.launch = &L;
  B.idx = idx;
  B.n_exited = 0;
  B.barrier_gen = 0;
  B.syncwarp_gen.assign((L.threads + 31) / 32, 0);
  B.pending.assign((L.threads + 31) / 32, {});
  B.rng = (L.cfg.seed ^ (linear * 0xbf58476d1ce4e5b9ull)) | 1;
  const int n = L.threads;
  B.sync.reset(new char[2 + 2 * ((n + 31) / 32)]);
  arena.begin_block(L.dyn_smem);
  stacks.reserve(n);
  B.fibers.assign(n, Fiber{});
  B.order.resize(n);
  for (int t = 0; t < n; ++t) {
    Fiber& f = B.fibers[t];
    f.tid = t;
    f.tc.thread_idx = uint3{static_cast<unsigned>(t % L.block.x), static_cast<unsigned>(t / L.block.x % L.block.y),
                            static_cast<unsigned>(t / (L.block.x * L.block.y))};
    f.tc.block_idx = idx;
    f.tc.block_dim = L.block;
    f.tc.grid_dim = L.grid;
    f.tc.lane = t % 32;
    f.tc.warp = t / 32;
    f.tc.fiber = &f;
    f.worker = this;
    fiber_side_create(f.side, stacks.bottom(t), StackPool::size());
    make_context(f.ctx, stacks.bottom(t), StackPool::size(), &fiber_main, &f);
    B.order[t] = t;
  }
  if (L.cfg.schedule == Schedule::kReverse) std::reverse(B.order.begin(), B.order.end());
  traffic_block_begin(*this);
  schedule(L, B);
  if (!L.failed.load()) {
    const std::string overrun = arena.check_redzones();
    if (!overrun.empty()) L.record_error(describe(L, B, nullptr) + overrun);
  }
  for (Fiber& f : B.fibers) fiber_side_destroy(f.side);
  arena.end_block();
  stacks.end_block(n);
  B.sync.reset();
}

// A round runs every runnable thread once, in the round's order, each until it blocks or exits; a blocking
// thread hands over to the next one directly (hand_over), the last to the scheduler.
void Worker::schedule(Launch& L, Block& B) {
  const int n = static_cast<int>(B.fibers.size());
  for (;;) {
    if (L.cfg.schedule == Schedule::kShuffle) {
      for (int i = n - 1; i > 0; --i) {  // Fisher-Yates with xorshift64
        B.rng ^= B.rng << 13, B.rng ^= B.rng >> 7, B.rng ^= B.rng << 17;
        std::swap(B.order[i], B.order[B.rng % (i + 1)]);
      }
    }
    B.pos = 0;
    Fiber* first = B.next_runnable();
    if (first != nullptr) resume(*first);
    if (L.failed.load()) return;
    if (B.n_exited == n) return;
    if (first == nullptr) resolve_stall(L, B);
    if (L.failed.load()) return;
  }
}

void Worker::resume(Fiber& f) {
  tls_thread = &f.tc;
  switch_context(sched_ctx, sched_side, f.ctx, f.side, false);
  tls_thread = nullptr;
}

void Worker::hand_over(Fiber& f, bool finishing) {
  Fiber* g = block.launch->failed.load() ? nullptr : block.next_runnable();
  if (g == nullptr) {
    switch_context(f.ctx, f.side, sched_ctx, sched_side, finishing);
    return;
  }
  tls_thread = &g->tc;
  switch_context(f.ctx, f.side, g->ctx, g->side, finishing);
}

void Worker::yield(Fiber& f) { hand_over(f, false); }

void Worker::finish(Fiber& f) {
  hand_over(f, true);
  __builtin_unreachable();
}

void Worker::resolve_stall(Launch& L, Block& B) {
  const int n = static_cast<int>(B.fibers.size());
  const Fiber *at_barrier = nullptr, *exited = nullptr, *at_warp = nullptr;
  int n_barrier = 0;
  for (const Fiber& f : B.fibers) {
    if (f.state == State::kBarrier) {
      ++n_barrier;
      at_barrier = at_barrier ? at_barrier : &f;
    } else if (f.state == State::kExited) {
      exited = exited ? exited : &f;
    } else if (f.state == State::kWarp) {
      at_warp = at_warp ? at_warp : &f;
    }
  }
  if (at_warp != nullptr) {
    L.record_error(describe(L, B, at_warp) + missing_lane(B, *at_warp));
    return;
  }
  if (n_barrier < n) {
    L.record_error(describe(L, B, at_barrier) + "__syncthreads at " + site(*at_barrier) + " reached by " +
                   std::to_string(n_barrier) + " of " + std::to_string(n) + " threads: thread " +
                   idx_str(exited->tc.thread_idx) + " exited without reaching it");
    return;
  }
  for (const Fiber& f : B.fibers) {
    if (f.line != at_barrier->line || std::strcmp(f.file, at_barrier->file) != 0) {
      L.record_error(describe(L, B, &f) + "divergent __syncthreads: this thread waits at " + site(f) + ", thread " +
                     idx_str(at_barrier->tc.thread_idx) + " at " + site(*at_barrier));
      return;
    }
  }
  const std::string overrun = arena.check_redzones();
  if (!overrun.empty()) {
    L.record_error(describe(L, B, nullptr) + overrun);
    return;
  }
  ++B.barrier_gen;
  for (Fiber& f : B.fibers) f.state = State::kRunnable;
}

// ---------------------------------------------------------------- launches
namespace {

std::string check_config(const Launch& L) {
  const dim3 g = L.grid, b = L.block;
  auto dims = [](dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
  };
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || uint64_t(b.x) * b.y * b.z > 1024)
    return "block " + dims(b) + " exceeds the limits (x, y <= 1024, z <= 64, at most 1024 threads)";
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return "grid " + dims(g) + " exceeds the limits (x < 2^31, y and z <= 65535)";
  const size_t max_smem = max_block_smem(L.cfg.arch);
  if (L.info->static_smem + L.dyn_smem > max_smem)
    return std::to_string(L.dyn_smem) + " bytes of dynamic shared memory (plus " +
           std::to_string(L.info->static_smem) + " static) exceed the " + std::to_string(max_smem) + " bytes of sm_" +
           std::to_string(L.cfg.arch);
  const size_t max_dyn =
      L.info->max_dynamic_smem >= 0 ? size_t(L.info->max_dynamic_smem) : kDefaultSmem - L.info->static_smem;
  if (L.dyn_smem > max_dyn)
    return std::to_string(L.dyn_smem) + " bytes of dynamic shared memory exceed the kernel's limit of " +
           std::to_string(max_dyn) +
           (L.info->max_dynamic_smem >= 0 ? "" : " (48 KiB less static: above it needs cudaFuncSetAttribute)");
  return {};
}

// Persistent helper threads; the launching thread works too. Never destroyed (joinable threads at exit would
// terminate the process).
class Pool {
 public:
  void run(Launch& L, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (; n_threads_ < helpers; ++n_threads_) std::thread([this] { loop(); }).detach();
      job_ = &L;
      slots_ = helpers;
      ++epoch_;
    }
    cv_.notify_all();
    this_worker().run(L);
    std::unique_lock<std::mutex> lock(mutex_);
    slots_ = 0;  // helpers that have not started yet do not start
    done_.wait(lock, [this] { return active_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return epoch_ != seen; });
      seen = epoch_;
      if (slots_ == 0) continue;
      --slots_;
      ++active_;
      Launch* L = job_;
      lock.unlock();
      this_worker().run(*L);
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_, done_;
  int n_threads_ = 0;
  Launch* job_ = nullptr;
  int slots_ = 0, active_ = 0;
  uint64_t epoch_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

// A random order of the grid's blocks: i -> (mul i + add) mod n with mul coprime to n.
void choose_block_order(Launch& L, std::mt19937_64& rng) {
  const uint64_t n = L.n_blocks;
  L.order_add = rng() % n;
  for (;;) {
    L.order_mul = rng() % n | 1;
    uint64_t a = L.order_mul, b = n;
    while (b != 0) a %= b, std::swap(a, b);
    if (a == 1) return;
  }
}

std::mutex g_launch_mutex;  // one emulated device: launches from several host threads run one at a time

}  // namespace

void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, KernelThunk thunk, const void* ctx) {
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  Launch L;
  L.kernel = kernel;
  L.cfg = read_config();
  L.grid = grid;
  L.block = block;
  L.dyn_smem = dynamic_smem;
  L.thunk = thunk;
  L.ctx = ctx;
  {
    std::lock_guard<std::mutex> lock(kernels_mutex());
    L.info = &kernel_info_locked(kernel);
    kernels_run().insert(L.info->name);
    const std::string bad = check_config(L);
    if (!bad.empty()) {
      set_error(cudaErrorInvalidConfiguration, "linmix CUDA emulator: " + L.info->name + ": invalid launch: " + bad);
      return;
    }
  }
  L.threads = static_cast<int>(block.x * block.y * block.z);
  L.n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::mt19937_64 rng(L.cfg.seed);
  choose_block_order(L, rng);
  for (int kind = 0; kind < kWmmaKinds; ++kind) {
    uint8_t perm[256];
    for (int i = 0; i < 256; ++i) perm[i] = static_cast<uint8_t>(i);
    std::shuffle(perm, perm + 256, rng);
    std::memcpy(L.wmma_pos[kind], perm, 256);
  }
  hb_release(&L.sync_in);
  traffic_launch_begin();
  const int helpers = static_cast<int>(std::min<uint64_t>(L.cfg.workers, L.n_blocks)) - 1;
  if (helpers > 0) {
    pool().run(L, helpers);
  } else {
    this_worker().run(L);
  }
  hb_acquire(&L.sync_out);
  traffic_launch_end(L);
  if (L.failed.load()) set_error(cudaErrorLaunchFailure, L.error);
}

// ---------------------------------------------------------------- runtime API
cudaError_t get_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

const char* get_error_string(cudaError_t err) {
  if (err != cudaSuccess && !t_last_message.empty()) return t_last_message.c_str();
  return err == cudaSuccess ? "no error" : "linmix CUDA emulator error";
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  std::memset(attr, 0, sizeof(*attr));
  std::lock_guard<std::mutex> lock(kernels_mutex());
  const KernelInfo& k = kernel_info_locked(kernel);
  attr->sharedSizeBytes = k.static_smem;  // known once a block of it ran
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes =
      k.max_dynamic_smem >= 0 ? k.max_dynamic_smem : static_cast<int>(kDefaultSmem - k.static_smem);
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(kernels_mutex());
  KernelInfo& k = kernel_info_locked(kernel);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  const size_t max_smem = max_block_smem(read_arch());
  if (value < 0 || k.static_smem + static_cast<size_t>(value) > max_smem) {
    set_error(cudaErrorInvalidValue, "linmix CUDA emulator: " + k.name + ": cudaFuncSetAttribute(" +
                                         "MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                         ") exceeds the block's shared memory (" + std::to_string(max_smem) + ")");
    return cudaErrorInvalidValue;
  }
  k.max_dynamic_smem = value;
  return cudaSuccess;
}

cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

}  // namespace linmix::emu

// ---------------------------------------------------------------- for the extension (common/emulation.cpp)
extern "C" __attribute__((visibility("default"))) const char* linmix_emu_kernels_run() {
  static std::string out;
  std::lock_guard<std::mutex> lock(linmix::emu::kernels_mutex());
  out.clear();
  for (const std::string& k : linmix::emu::kernels_run()) out += k + "\n";
  return out.c_str();
}
