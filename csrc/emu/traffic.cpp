// Global-memory traffic of emulated launches: the traffic build (LINMIX_EMU_SANITIZER=traffic).
//
// Its kernels are compiled with gcc's -fsanitize=kernel-address and a call threshold of 0 (CMakeLists.txt), so
// every load and store of the kernel's own code, inlined emulator headers included (WMMA loads and stores, the
// argument copy), calls __asan_{load,store}{1,2,4,8,16,N}_noabort with its address and size. The callbacks below
// keep what falls outside the memory an emulated thread may touch that is not global memory: its fiber stack
// (locals, the kernel's parameters), the block's shared-memory arena, the fibers' built-in variables, and the
// launching thread's stack (the parameter buffer, the launch's WMMA layouts). What is left is global memory, as
// CUDA has no other space the kernels use. Accesses outside a kernel (the launchers' host code) do not count.
//
// Per launch: bytes requested (every access, read and write apart) and unique bytes (each byte once per launch
// and direction), kept per worker thread and merged when the launch ends. linmix.emulation.traffic() reads them.
#include <pthread.h>

#include <array>
#include <bit>
#include <cstdio>
#include <string>
#include <unordered_map>

#include "emu/internal.h"

namespace linmix::emu {
namespace {

constexpr bool kCounting = kSanitizer == 3;

struct Range {
  uintptr_t lo = 0, hi = 0;
  bool has(uintptr_t a) const { return a - lo < hi - lo; }
};

// A set of bytes: one bit per byte, in 4 KiB pages.
class ByteSet {
 public:
  void add(uintptr_t a, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      const uintptr_t b = a + i, page = b >> kPageBits, off = b & (kPage - 1);
      if (page != last_page_ || last_ == nullptr) {
        last_ = &pages_[page];
        last_page_ = page;
      }
      (*last_)[off / 64] |= uint64_t(1) << (off % 64);
    }
  }
  void merge(const ByteSet& o) {
    for (const auto& [page, bits] : o.pages_) {
      Bits& mine = pages_[page];
      for (size_t w = 0; w < bits.size(); ++w) mine[w] |= bits[w];
    }
  }
  uint64_t count() const {
    uint64_t n = 0;
    for (const auto& [page, bits] : pages_)
      for (uint64_t w : bits) n += std::popcount(w);
    return n;
  }
  void clear() {
    pages_.clear();
    last_ = nullptr;
  }

 private:
  static constexpr int kPageBits = 12;
  static constexpr uintptr_t kPage = uintptr_t(1) << kPageBits;
  using Bits = std::array<uint64_t, kPage / 64>;
  std::unordered_map<uintptr_t, Bits> pages_;
  uintptr_t last_page_ = 0;
  Bits* last_ = nullptr;
};

struct Counts {
  uint64_t read = 0, written = 0;
  ByteSet read_set, write_set;
  void merge(const Counts& o) {
    read += o.read, written += o.written;
    read_set.merge(o.read_set), write_set.merge(o.write_set);
  }
  void clear() {
    read = written = 0;
    read_set.clear(), write_set.clear();
  }
};

// This worker thread's counts in the launch in flight, and the ranges of its block that are not global memory.
struct WorkerTraffic {
  Counts counts;
  Range stacks, arena, fibers;
};
thread_local WorkerTraffic t_traffic;

std::mutex g_mutex;
Counts g_launch;       // the launch in flight (launches run one at a time)
Range g_host_stack;    // its launching thread's stack
std::string g_records;  // one line per finished launch

Range this_thread_stack() {
  pthread_attr_t attr;
  void* addr = nullptr;
  size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
  }
  return Range{reinterpret_cast<uintptr_t>(addr), reinterpret_cast<uintptr_t>(addr) + size};
}

}  // namespace

// One access of the running kernel: counted unless it falls in memory that is not global.
inline void record(uintptr_t a, size_t n, bool write) {
  if (tls_thread == nullptr) return;  // host code of the launchers
  WorkerTraffic& w = t_traffic;
  if (w.stacks.has(a) || w.arena.has(a) || w.fibers.has(a) || g_host_stack.has(a)) return;
  if (write) {
    w.counts.written += n;
    w.counts.write_set.add(a, n);
  } else {
    w.counts.read += n;
    w.counts.read_set.add(a, n);
  }
}

void traffic_launch_begin() {
  if (!kCounting) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_launch.clear();
  g_host_stack = this_thread_stack();
}

void traffic_block_begin(Worker& w) {
  if (!kCounting) return;
  WorkerTraffic& t = t_traffic;
  const auto [s_lo, s_hi] = w.stacks.range();
  t.stacks = Range{reinterpret_cast<uintptr_t>(s_lo), reinterpret_cast<uintptr_t>(s_hi)};
  t.arena = Range{reinterpret_cast<uintptr_t>(w.arena.base()),
                  reinterpret_cast<uintptr_t>(w.arena.base()) + Arena::kCapacity};
  const auto& f = w.block.fibers;
  t.fibers = Range{reinterpret_cast<uintptr_t>(f.data()), reinterpret_cast<uintptr_t>(f.data() + f.size())};
}

void traffic_worker_done() {
  if (!kCounting) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_launch.merge(t_traffic.counts);
  t_traffic.counts.clear();
}

const char* traffic_records(bool reset) {
  static std::string out;
  std::lock_guard<std::mutex> lock(g_mutex);
  out = g_records;
  if (reset) g_records.clear();
  return out.c_str();
}

void traffic_launch_end(const Launch& L) {
  if (!kCounting) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  char line[512];
  std::snprintf(line, sizeof line, "%s\t%llu\t%llu\t%llu\t%llu\t%llu\n", L.info->name.c_str(),
                static_cast<unsigned long long>(L.n_blocks), static_cast<unsigned long long>(g_launch.read),
                static_cast<unsigned long long>(g_launch.written),
                static_cast<unsigned long long>(g_launch.read_set.count()),
                static_cast<unsigned long long>(g_launch.write_set.count()));
  g_records += line;
  g_launch.clear();
}

}  // namespace linmix::emu

// The instrumentation's callbacks (gcc's kernel-address ABI with a call for every access), in the traffic build
// only: the AddressSanitizer build's own come from its runtime.
#if LINMIX_EMU_SANITIZER == 3
#define LINMIX_EMU_ACCESS(n)                                                                                 \
  extern "C" void __asan_load##n##_noabort(uintptr_t a) { linmix::emu::record(a, n, false); }              \
  extern "C" void __asan_store##n##_noabort(uintptr_t a) { linmix::emu::record(a, n, true); }
LINMIX_EMU_ACCESS(1)
LINMIX_EMU_ACCESS(2)
LINMIX_EMU_ACCESS(4)
LINMIX_EMU_ACCESS(8)
LINMIX_EMU_ACCESS(16)
#undef LINMIX_EMU_ACCESS
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) { linmix::emu::record(a, n, false); }
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) { linmix::emu::record(a, n, true); }
extern "C" void __asan_handle_no_return() {}
#endif

// For linmix.emulation.traffic(): one line per launch since the last reset, "kernel\tblocks\tread\twritten\t
// unique read\tunique written" (bytes); reset clears them.
extern "C" __attribute__((visibility("default"))) const char* linmix_emu_traffic(int reset) {
  return linmix::emu::traffic_records(reset != 0);
}
