// Running the CUDA kernels on the CPU: with LINMIX_EMULATE_CUDA=1 (read at every call) the CPU backend sends
// fp32/fp16/bf16 calls of every op through the CUDA launchers of the emulated build of the kernels (csrc/emu/, a
// library beside the extension, loaded on first use) instead of the CPU kernels; fp64 stays on the CPU kernels.
// LINMIX_EMU_SANITIZER=address|thread picks the build instrumented with AddressSanitizer or ThreadSanitizer (the
// process must then run with that sanitizer's runtime preloaded: `python -m linmix.emulation --help`); =traffic the
// build that counts every kernel's global-memory bytes (csrc/emu/traffic.cpp; nothing to preload).
// Torch-free.
#pragma once

#include <cstddef>
#include <string>
#include <utility>

namespace linmix {

bool emulate_cuda();

// The emulated build's table named `name` of `size` bytes; throws (naming what to build or preload) if there is
// none. The emulator's state per process: the library is loaded once.
const void* emulated_launcher_table(const char* name, size_t size);

template <typename Launchers>
const Launchers& emulated_launchers() {
  return *static_cast<const Launchers*>(emulated_launcher_table(Launchers::kName, sizeof(Launchers)));
}

// Which emulated builds sit beside the extension: "plain", "address", "thread", "traffic" (comma-separated, may be empty).
std::string emulated_builds();
// Names of the kernels the emulated build has run in this process, one per line ("" if it was never loaded).
std::string emulated_kernels_run();
// Runs one of the emulator's self-tests (csrc/emu/selftest.cpp): its code (0 ran correctly, 1 the emulator
// reported an error, 2 ran with a wrong result) and message.
std::pair<int, std::string> emulator_selftest(const std::string& name);

}  // namespace linmix
