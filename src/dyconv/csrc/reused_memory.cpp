// Reused memory for the large gradients that dyconv's compiled kernel hands back (built with cpu_kernel.cpp).
//
// glibc's malloc maps every block above its mmap threshold (which it raises as blocks are freed, up to 32 MiB)
// afresh from the kernel and unmaps it on free, and the kernel maps each 4 KiB page of it on the first write: a minor
// page fault. The experts' gradient of a large layer is such a block, allocated by every training step's backward:
// 37.7 MB for a 3x3 512->512 layer with four experts, 9.2 thousand page faults a step (dyconv bench's page-fault
// table); with this pool that layer's training step took 8.0 ms less a paired round (benchmarks/ab.py --against
// 82ec894 --layer "3x3 512" --figures train --format contiguous --rounds 9, README). reused_empty takes blocks of
// at least kReusedMinBytes from a pool instead, which keeps the blocks given back (by size, at most kReusedMaxBytes
// in all; past that they are freed) for the next request of the same size. Each block is reported to PyTorch's
// profiler as its own CPU allocator reports its blocks (an allocation when handed out, a free when given back), so
// memory profiles (the bench's peak training memory) count it while a tensor holds it.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace dyconv_cpu {

namespace {

constexpr size_t kReusedMinBytes = size_t(4) << 20;
constexpr size_t kReusedMaxBytes = size_t(512) << 20;

class ReusedMemory final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);  // throws where the memory cannot be had
    size_t in_use, kept;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      in_use = in_use_ += bytes;
      kept = kept_;
    }
    c10::reportMemoryUsageToProfiler(data, static_cast<int64_t>(bytes), in_use, in_use + kept,
                                     c10::Device(c10::DeviceType::CPU));
    return {data, new Block{data, bytes}, &ReusedMemory::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // bytes held by tensors, bytes kept for reuse
  std::vector<int64_t> bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(in_use_), static_cast<int64_t>(kept_)};
  }

  // frees every kept block
  void release() {
    std::unordered_multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      blocks.swap(free_);
      kept_ = 0;
    }
    for (auto& block : blocks) c10::free_cpu(block.second);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    kept_ -= bytes;
    return data;
  }

  static void give_back(void* context);

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;  // kept blocks by size
  size_t in_use_ = 0, kept_ = 0;
};

// never destroyed: tensors freed during the process's exit still give their blocks back to it
ReusedMemory& pool() {
  static ReusedMemory* memory = new ReusedMemory();
  return *memory;
}

void ReusedMemory::give_back(void* context) {
  auto* block = static_cast<Block*>(context);
  ReusedMemory& memory = pool();
  bool keep;
  size_t in_use, kept;
  {
    std::lock_guard<std::mutex> guard(memory.mutex_);
    memory.in_use_ -= block->bytes;
    keep = memory.kept_ + block->bytes <= kReusedMaxBytes;
    if (keep) {
      memory.free_.emplace(block->bytes, block->data);
      memory.kept_ += block->bytes;
    }
    in_use = memory.in_use_;
    kept = memory.kept_;
  }
  c10::reportMemoryUsageToProfiler(block->data, -static_cast<int64_t>(block->bytes), in_use, in_use + kept,
                                   c10::Device(c10::DeviceType::CPU));
  if (!keep) c10::free_cpu(block->data);
  delete block;
}

std::vector<int64_t> reused_memory_bytes() { return pool().bytes(); }

void release_reused_memory() { pool().release(); }

}  // namespace

// An uninitialised CPU tensor of `sizes` (contiguous): from the pool where it takes at least kReusedMinBytes.
at::Tensor reused_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kReusedMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

}  // namespace dyconv_cpu

TORCH_LIBRARY_FRAGMENT(dyconv_cpu, m) {
  m.def("reused_memory_bytes() -> int[]", &dyconv_cpu::reused_memory_bytes);
  m.def("release_reused_memory() -> ()", &dyconv_cpu::release_reused_memory);
}
