// Fibers for the CUDA emulator: one per emulated CUDA thread, switched cooperatively at barriers and warp
// collectives. A minimal x86-64 context switch (callee-saved registers, the x87 and SSE control words) with the
// sanitizers told about every switch: AddressSanitizer about the stack in use, ThreadSanitizer about which
// logical thread runs (switches carry no synchronisation: only barriers do, runtime.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace linmix::emu {

// LINMIX_EMU_SANITIZER is 0 (plain), 1 (AddressSanitizer), 2 (ThreadSanitizer) or 3 (traffic: every access of the
// kernels counted, traffic.cpp): the variant of the kernels this runtime is linked with. The runtime itself is
// never instrumented.
#if !defined(LINMIX_EMU_SANITIZER)
#define LINMIX_EMU_SANITIZER 0
#endif
constexpr int kSanitizer = LINMIX_EMU_SANITIZER;

// A saved execution context: a stack pointer into a stack holding the callee-saved registers.
struct Context {
  void* sp = nullptr;
};

// The stacks of one block's fibers: `count` stacks of `size` bytes, each above a guard page. Under
// ThreadSanitizer a block's stacks are mapped fresh (the unmap forgets the previous block's accesses to them,
// which would otherwise look like races between blocks).
class StackPool {
 public:
  ~StackPool();
  void reserve(int count);  // at least `count` usable stacks
  char* bottom(int i) const { return base_ + static_cast<size_t>(i) * stride() + kGuard; }
  static size_t size();
  // The whole mapping, guard pages included: [first, second).
  std::pair<const char*, const char*> range() const { return {base_, base_ + static_cast<size_t>(count_) * stride()}; }
  // After a block that used the first n stacks: AddressSanitizer forgets the poison its frames left (fibers
  // abandoned mid-call never unwind); ThreadSanitizer gets fresh stacks for the next block.
  void end_block(int n);

 private:
  void release();
  static constexpr size_t kGuard = 4096;
  static size_t stride() { return size() + kGuard; }
  char* base_ = nullptr;
  int count_ = 0;
};

// Prepares `ctx` so that switching to it calls entry(arg) on the stack [bottom, bottom + size); entry never returns.
void make_context(Context& ctx, char* bottom, size_t size, void (*entry)(void*), void* arg);

// The sanitizers' bookkeeping around a switch. A FiberSide names one side of switches: a fiber, or the
// scheduler's own (native) stack.
struct FiberSide {
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
};
void fiber_side_create(FiberSide& side, char* bottom, size_t size);  // a new fiber
void fiber_side_native(FiberSide& side);                             // the calling OS thread
void fiber_side_destroy(FiberSide& side);
// Switch from `from` (whose context is saved in `from_ctx`) to `to`. `finishing`: `from` never runs again.
void switch_context(Context& from_ctx, FiberSide& from, const Context& to_ctx, FiberSide& to, bool finishing);
// The first thing a new fiber does (AddressSanitizer completes the switch that entered it, and learns the
// scheduler's stack from the first one).
void fiber_entered(FiberSide& self, FiberSide& scheduler);

// Clears AddressSanitizer's poison left on a stack by a fiber that was abandoned mid-call.
void unpoison(const void* p, size_t n);
void poison(const void* p, size_t n);

// ThreadSanitizer happens-before edges (no-ops in the other variants).
void hb_release(const void* addr);
void hb_acquire(const void* addr);

}  // namespace linmix::emu
