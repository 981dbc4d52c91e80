// Zero every parameter gradient when the gate closed, in one launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dgg {

// table: int64[n_entries * 2] in device memory, entry e = (address, nbytes) of
//   one gradient's dense storage span.  Zero bits are +0.0 in float32,
//   bfloat16 and float16 alike, so the kernel writes bytes and needs no dtype
//   tag.  Spans must not overlap unless they are identical.
// decision: a bool in device memory; the kernel reads it first and returns at
//   once when it is 0 (open), leaving every gradient bit-for-bit untouched.
// blocks: grid size (the caller passes min(a few per SM, work / threads)).
cudaError_t launch_gate_mask(const bool* decision, const int64_t* table, int64_t n_entries, int blocks,
                             cudaStream_t stream);

// Threads per block of the mask kernel, for the caller's grid arithmetic.
int gate_mask_threads();

}  // namespace dgg
