// Fibers for the CUDA emulator (fiber.h).
#include "emu/fiber.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

#if LINMIX_EMU_SANITIZER == 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#elif LINMIX_EMU_SANITIZER == 2
#include <sanitizer/tsan_interface.h>
#endif

// linmix_emu_switch(void** save_sp, void* new_sp): push the callee-saved registers and the x87 / SSE control
// words, save rsp, load the other stack, pop the same and return into it. linmix_emu_fiber_start: where a new
// context first "returns" to; calls r13(r12).
asm(R"(
  .text
  .p2align 4
  .globl linmix_emu_switch
  .hidden linmix_emu_switch
  .type linmix_emu_switch,@function
linmix_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  fnstcw (%rsp)
  stmxcsr 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size linmix_emu_switch, .-linmix_emu_switch

  .p2align 4
  .globl linmix_emu_fiber_start
  .hidden linmix_emu_fiber_start
  .type linmix_emu_fiber_start,@function
linmix_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size linmix_emu_fiber_start, .-linmix_emu_fiber_start
  .section .note.GNU-stack,"",@progbits
  .text
)");

extern "C" void linmix_emu_switch(void** save_sp, void* new_sp);
extern "C" void linmix_emu_fiber_start();

namespace linmix::emu {

size_t StackPool::size() {
  // AddressSanitizer's redzones roughly triple frames; kernels keep register tiles of a few KiB.
  return kSanitizer == 1 ? 512 * 1024 : 128 * 1024;
}

StackPool::~StackPool() { release(); }

void StackPool::release() {
  if (base_ != nullptr) munmap(base_, static_cast<size_t>(count_) * stride());
  base_ = nullptr;
  count_ = 0;
}

void StackPool::end_block(int n) {
  if (kSanitizer == 1) unpoison(bottom(0), static_cast<size_t>(n) * stride() - kGuard);
  if (kSanitizer == 2) release();
}

void StackPool::reserve(int count) {
  if (count <= count_) return;
  release();
  const size_t bytes = static_cast<size_t>(count) * stride();
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "linmix CUDA emulator: cannot map %zu bytes of fiber stacks\n", bytes);
    std::abort();
  }
  base_ = static_cast<char*>(p);
  count_ = count;
  // Guard pages turn a stack overflow into a fault; ThreadSanitizer maps stacks fresh for every block, where one
  // mprotect per thread would cost more than the block.
  if (kSanitizer != 2)
    for (int i = 0; i < count; ++i) mprotect(base_ + static_cast<size_t>(i) * stride(), kGuard, PROT_NONE);
}

void make_context(Context& ctx, char* bottom, size_t size, void (*entry)(void*), void* arg) {
  // Frame popped by linmix_emu_switch, from the saved sp upwards: x87 control word, mxcsr (16 bytes), r15, r14,
  // r13, r12, rbx, rbp, return address. The return address sits at 8 mod 16 so that linmix_emu_fiber_start
  // calls entry with the ABI's 16-byte alignment.
  uintptr_t top = (reinterpret_cast<uintptr_t>(bottom) + size) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 24);  // the return address
  slot[0] = reinterpret_cast<uint64_t>(&linmix_emu_fiber_start);
  slot[-1] = 0;                                        // rbp
  slot[-2] = 0;                                        // rbx
  slot[-3] = reinterpret_cast<uint64_t>(arg);          // r12
  slot[-4] = reinterpret_cast<uint64_t>(entry);        // r13
  slot[-5] = 0;                                        // r14
  slot[-6] = 0;                                        // r15
  auto* ctrl = reinterpret_cast<uint32_t*>(slot - 8);  // 16 bytes: x87 control word, then mxcsr
  ctrl[0] = 0x037f;
  ctrl[1] = 0;
  ctrl[2] = 0x1f80;
  ctrl[3] = 0;
  ctx.sp = slot - 8;
}

void fiber_side_create(FiberSide& side, char* bottom, size_t size) {
  side.stack_bottom = bottom;
  side.stack_size = size;
  side.asan_fake_stack = nullptr;
#if LINMIX_EMU_SANITIZER == 1
  __asan_unpoison_memory_region(bottom, size);
#elif LINMIX_EMU_SANITIZER == 2
  side.tsan_fiber = __tsan_create_fiber(0);
#endif
}

void fiber_side_native(FiberSide& side) {
  side = FiberSide{};
#if LINMIX_EMU_SANITIZER == 2
  side.tsan_fiber = __tsan_get_current_fiber();
#endif
}

void fiber_side_destroy(FiberSide& side) {
#if LINMIX_EMU_SANITIZER == 2
  if (side.tsan_fiber != nullptr) __tsan_destroy_fiber(side.tsan_fiber);
#endif
  side.tsan_fiber = nullptr;
}

void switch_context(Context& from_ctx, FiberSide& from, const Context& to_ctx, FiberSide& to, bool finishing) {
#if LINMIX_EMU_SANITIZER == 1
  __sanitizer_start_switch_fiber(finishing ? nullptr : &from.asan_fake_stack, to.stack_bottom, to.stack_size);
#elif LINMIX_EMU_SANITIZER == 2
  __tsan_switch_to_fiber(to.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  (void)finishing, (void)from, (void)to;
  linmix_emu_switch(&from_ctx.sp, to_ctx.sp);
#if LINMIX_EMU_SANITIZER == 1
  // Back in `from`; the side we came from may be the scheduler, whose bounds the first switch taught us.
  __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
#endif
}

void fiber_entered(FiberSide& self, FiberSide& scheduler) {
#if LINMIX_EMU_SANITIZER == 1
  // The side we came from; the first fiber a worker ever enters comes from its scheduler (the native stack),
  // whose bounds the later switches back to it need.
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(self.asan_fake_stack, &bottom, &size);
  if (scheduler.stack_bottom == nullptr) scheduler.stack_bottom = bottom, scheduler.stack_size = size;
#endif
  (void)self;
  (void)scheduler;
}

void unpoison(const void* p, size_t n) {
#if LINMIX_EMU_SANITIZER == 1
  __asan_unpoison_memory_region(p, n);
#endif
  (void)p;
  (void)n;
}

void poison(const void* p, size_t n) {
#if LINMIX_EMU_SANITIZER == 1
  __asan_poison_memory_region(p, n);
#endif
  (void)p;
  (void)n;
}

void hb_release(const void* addr) {
#if LINMIX_EMU_SANITIZER == 2
  __tsan_release(const_cast<void*>(addr));
#endif
  (void)addr;
}

void hb_acquire(const void* addr) {
#if LINMIX_EMU_SANITIZER == 2
  __tsan_acquire(const_cast<void*>(addr));
#endif
  (void)addr;
}

}  // namespace linmix::emu
