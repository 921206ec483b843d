// The boundary between the torch-facing op (patch_embed_op.cpp) and the CUDA kernel (patch_embed.cu): raw
// pointers and a Geometry, so the .cu compiles without torch headers and the timing driver
// (csrc/tests/patch_embed_bench.cpp) can call it directly.
#pragma once

#include <cuda_runtime_api.h>

#include "patch_embed_core.h"

namespace pvt_fast {
namespace patch_embed {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct LaunchArgs {
  Geometry g;
  DType dtype;  // of x and out
  const void* x;
  const void* weight;  // packed: (Cout, packed_pitch(g)) contiguous, x's dtype
  const void* bias;
  const void* norm_weight;
  const void* norm_bias;
  bool params_fp32;  // bias, norm_weight and norm_bias: float32, else x's dtype
  int64_t bias_stride, norm_weight_stride, norm_bias_stride;
  float eps;
  void* out;  // contiguous (M, Cout), x's dtype
  float* workspace;  // (plan.splits, M, plan.npad) fp32 when plan_for(...).partial, else unused
  PlanKind plan_kind = PlanKind::kBest;  // which plans make_plan weighs (kBest unless a test asks)
  SplitShape split_shape{};  // warps != 0: this split plan (with about split_count splits), for tests
  int split_count = 1;
  int max_smem = kMaxSmemBytes;  // the device's opt-in shared memory per block, capped at kMaxSmemBytes
};

inline int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// The plan for these arguments: the one the op computes once and passes to launch_patch_embed.
inline Plan plan_for(const LaunchArgs& a) {
  const int es = elem_size(a.dtype);
  const int vec = choose_vec(a.g, es, reinterpret_cast<uintptr_t>(a.x));
  if (a.split_shape.warps != 0) return make_split_plan(a.g, es, vec, a.split_shape, a.split_count);
  return make_plan(a.g, es, vec, a.plan_kind, a.max_smem);
}

// Launches plan `pl` (plan_for(args), computed once by the caller, which sizes the workspace for it) on
// `stream` on the current device; returns the launch's error code. Requires M >= 1.
cudaError_t launch_patch_embed(const LaunchArgs& args, const Plan& pl, cudaStream_t stream);

}  // namespace patch_embed
}  // namespace pvt_fast
