// The fused gate step: one launch reads every monitor gradient, reduces the
// sum of squares deterministically and runs the finalize (docs/semantics.md)
// in the block that finishes last.  Host-side launchers take raw pointers and
// a cudaStream_t so this header needs no torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dgg_types.h"

namespace dgg {

// Blocks for one reduce launch over `table`: enough for one 16-byte vector per
// thread, at most max_blocks (the caller passes a few blocks per SM).  A pure
// function of the sizes, so the same tensors always get the same grid and
// hence the same summation order.
int gate_reduce_grid(const StepTensorTable& table, int max_blocks);

// Sum over chunks[0..n_chunks) of every element squared (each element widened
// to float32, squared and summed in float32 per thread and per block; the block
// partials summed in float64 in a fixed order), written to acc[0] (float64).
//
// chunks: up to kMaxStepTensors tensors each; more monitor tensors take one
//   launch per chunk.  Every launch writes its block partials to its own range
//   of `partials`; only the last launch takes a ticket, and its last block sums
//   all ranges.  Stream order makes the earlier launches' partials visible.
// grids[j]: blocks of launch j (from gate_reduce_grid); their sum must not
//   exceed partials_capacity (float32 elements).
// ticket: one uint32 in device memory, 0 before the call; the kernel sets it
//   back to 0, so no memset is needed between calls or CUDA-graph replays.
//   Two launches sharing partials/ticket must not run concurrently.
// state: when non-null the same launch also runs the finalize on it.
cudaError_t launch_gate_reduce(const StepTensorTable* chunks, const int* grids, int n_chunks, float* partials,
                               int64_t partials_capacity, unsigned int* ticket, double* acc,
                               const GateStateView* state, cudaStream_t stream);

// The finalize alone (one thread).  sums == nullptr: the energy is
// state.acc[0], for a collective that all-reduces acc between reduce and
// finalize.  Otherwise the energy is sums[0] + ... + sums[n_sums - 1] (float64,
// in that order), written to state.acc[0] first: the per-tensor results of
// separate reduce launches (overlap=True, one launch per monitor gradient as
// backward produces it, each with its own partials range and ticket).
cudaError_t launch_gate_finalize(const GateStateView& state, const double* sums, int64_t n_sums,
                                 cudaStream_t stream);

}  // namespace dgg
