// CUDA kernel of the fused patch embedding (conv + bias + LayerNorm -> tokens). What a block computes
// and reads is described and implemented in patch_embed_core.h (host-tested); this file adds what only
// a GPU has: the tensor-core product of one K chunk (wmma 16x16x16, fp32 accumulation; bf16 and fp16 on
// sm_80+, fp32 inputs on CUDA cores in exact fp32), the warp-shuffle LayerNorm reductions, the block's
// loop with its barriers, and the launcher (persistent grid: blocks per SM from the occupancy API, queried
// once per device and kernel, as the shared-memory attribute is set).
//
// Pointer arguments: x (B, Cin, H, W) for "nchw" or (B, H, W, Cin) for "nhwc", any strides, x's dtype;
// the packed weight (Cout, packed_pitch) contiguous, x's dtype (see patch_embed_core.h); bias /
// norm_weight / norm_bias (Cout,), any stride, x's dtype or fp32; out (B*Ho*Wo, Cout) contiguous, x's
// dtype. Masked: tokens past M, channels past Cout, columns past K, and every input pixel in the padding
// (never read).
//
// Split plans (see Plan in patch_embed_core.h) run two kernels: the conv tiles write fp32 sums to a
// workspace (splits, M, npad) the op allocates, and the norm pass adds them in split order and normalizes.
//
// Bytes moved per call (the minimum is x once + out once + the parameters; the traffic model's count is
// pvt_fast/kernels/patch_embed_cuda.py, checked against the host test's emulation):
//   x:   B*Cin*H*W elements, read from DRAM once (overlapping windows, k > s, re-read through L1/L2; a
//        split plan's tiles read it once per bn-channel column block),
//   w:   Cout*packed_pitch elements from L2 in 16-byte loads: once per block with a resident plan, per
//        bm-token tile with a streamed or split one; after the op's packing (one read and write of the weight),
//   workspace (split plans): splits*M*npad fp32 written once and read once by the norm pass,
//   out: B*Ho*Wo*Cout elements, written once, never read back.
// v1 stage 1 (224x224, batch 64, bf16, k=s=4, Cout 64): 19.3 MB in + 25.7 MB out = 45.0 MB.
// v2 stage 1 (same, k7 s4 p3): the same 45.0 MB. FLOPs: 2 * B*Ho*Wo * Cout * Cin*k*k.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "patch_embed_core.h"
#include "patch_embed_launch.h"

namespace pvt_fast {
namespace patch_embed {

template <>
struct ElemTraits<__half> {
  PE_HD static float to_float(__half v) { return __half2float(v); }
  PE_HD static __half from_float(float v) { return __float2half_rn(v); }
  PE_HD static __half zero() { return __ushort_as_half(0); }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  PE_HD static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  PE_HD static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  PE_HD static __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
};

namespace {

struct KernelArgs {
  Geometry g;
  Plan plan;
  const void* x;
  const void* weight;
  const void* bias;
  const void* norm_weight;
  const void* norm_bias;
  int64_t bias_stride, norm_weight_stride, norm_bias_stride;
  void* out;
  float* workspace;  // split plans: (splits, M, npad) fp32
  float eps;
  bool params_fp32, out_vec4;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// C (+)= A * Wt^T for one chunk on tensor cores. Warp (wm, wn) owns the 16-row strip wm of C and the
// column tiles wn, wn + warps_n, ...; the A fragment is loaded once per 16-wide k step and reused.
template <class T>
__device__ __forceinline__ void tensor_core_chunk(const Plan& pl, const T* a, const T* ws, float* c, bool first,
                                                  int warp) {
  namespace wmma = nvcuda::wmma;
  const int wm = warp % pl.warps_m;
  const int wn = warp / pl.warps_m;
  const int col_tiles = pl.bn / 16;
  float* c_strip = c + wm * 16 * pl.ldc;
  const T* a_strip = a + wm * 16 * pl.lda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMaxFragmentsPerWarp];
#pragma unroll
  for (int f = 0; f < kMaxFragmentsPerWarp; ++f) {
    const int nt = wn + f * pl.warps_n;
    if (nt >= col_tiles) continue;
    if (first)
      wmma::fill_fragment(acc[f], 0.f);
    else
      wmma::load_matrix_sync(acc[f], c_strip + nt * 16, pl.ldc, wmma::mem_row_major);
  }
  for (int k0 = 0; k0 < pl.bk; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
    wmma::load_matrix_sync(af, a_strip + k0, pl.lda);
#pragma unroll
    for (int f = 0; f < kMaxFragmentsPerWarp; ++f) {
      const int nt = wn + f * pl.warps_n;
      if (nt >= col_tiles) continue;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
      wmma::load_matrix_sync(bf, ws + nt * 16 * pl.ldw + k0, pl.ldw);
      wmma::mma_sync(acc[f], af, bf, acc[f]);
    }
  }
#pragma unroll
  for (int f = 0; f < kMaxFragmentsPerWarp; ++f) {
    const int nt = wn + f * pl.warps_n;
    if (nt < col_tiles) wmma::store_matrix_sync(c_strip + nt * 16, acc[f], pl.ldc, wmma::mem_row_major);
  }
}
#endif

template <class T>
__device__ __forceinline__ void mma_chunk(const Plan& pl, const T* a, const T* ws, float* c, bool first, int tid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!std::is_same<T, float>::value) {
    tensor_core_chunk(pl, a, ws, c, first, tid / 32);
    return;
  }
#endif
  simt_mma_chunk(pl, a, ws, c, first, tid, pl.threads);
}

// Sum over the `lanes` lanes (a power of two, aligned group) that share one LayerNorm row.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int off = lanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <class T>
__device__ __forceinline__ void normalize_tile(const Geometry& g, const Plan& pl, const float* c,
                                               const float* params, int64_t m0, float eps,
                                               const GlobalWriter<T>& out, int tid) {
  const int lanes = pl.lanes_per_row;
  const int rows_per_warp = 32 / lanes;
  const int warp = tid / 32, lane = tid % 32;
  const int sub = lane % lanes;
  const float inv_n = 1.f / static_cast<float>(g.Cout);
  // Every lane of a warp runs the same iterations (bm is a multiple of rows_per_warp): the shuffles
  // need the full warp.
  for (int r0 = warp * rows_per_warp; r0 < pl.bm; r0 += pl.warps * rows_per_warp) {
    const int r = r0 + lane / lanes;
    const float* c_row = c + r * pl.ldc;
    const float mean = group_sum(row_partial_sum(c_row, params, g.Cout, pl.npad, sub, lanes), lanes) * inv_n;
    const float var =
        group_sum(row_partial_sqdev(c_row, params, g.Cout, pl.npad, mean, sub, lanes), lanes) * inv_n;
    const float rstd = rsqrtf(var + eps);
    const int64_t m = m0 + r;
    if (m < g.M) row_store(c_row, params, g.Cout, pl.npad, mean, rstd, sub, lanes, m * g.Cout, out);
  }
}

// bias, LayerNorm weight and bias into shared memory as fp32, from either parameter dtype.
template <class T>
__device__ __forceinline__ void load_block_params(const KernelArgs& args, float* params, int tid) {
  const Plan& pl = args.plan;
  if (args.params_fp32)
    load_params(pl, args.g.Cout, static_cast<const float*>(args.bias), static_cast<const float*>(args.norm_weight),
                static_cast<const float*>(args.norm_bias), args.bias_stride, args.norm_weight_stride,
                args.norm_bias_stride, params, tid, pl.threads);
  else
    load_params(pl, args.g.Cout, static_cast<const T*>(args.bias), static_cast<const T*>(args.norm_weight),
                static_cast<const T*>(args.norm_bias), args.bias_stride, args.norm_weight_stride,
                args.norm_bias_stride, params, tid, pl.threads);
}

// The conv tiles of a plan: normalized tokens (fused plan) or fp32 partial sums in the workspace (split
// plan, finished by patch_embed_norm_kernel).
template <class T, int V>
__global__ void __launch_bounds__(512, 1) patch_embed_kernel(const KernelArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Geometry& g = args.g;
  const Plan& pl = args.plan;
  float* params = reinterpret_cast<float*>(smem + pl.off_params);
  T* ws = reinterpret_cast<T*>(smem + pl.off_w);
  T* a = reinterpret_cast<T*>(smem + pl.off_a);
  float* c = reinterpret_cast<float*>(smem + pl.off_c);
  TokenOrigin* tok = reinterpret_cast<TokenOrigin*>(smem + pl.off_tok);
  ColumnTap* col = reinterpret_cast<ColumnTap*>(smem + pl.off_col);
  const int tid = threadIdx.x;
  const GlobalReader<T> x{static_cast<const T*>(args.x)};
  const GlobalReader<T> w{static_cast<const T*>(args.weight)};
  const GlobalWriter<T> out{static_cast<T*>(args.out), args.out_vec4};
  const GlobalWorkspace workspace{args.workspace};

  if (!pl.partial) load_block_params<T>(args, params, tid);
  const bool resident = !pl.partial && pl.chunks == 1;
  if (resident) {
    build_columns(g, pl, 0, col, tid, pl.threads);
    gather_w(g, pl, 0, 0, w, ws, tid, pl.threads);
  }
  for (int64_t tile = blockIdx.x; tile < pl.tiles; tile += gridDim.x) {
    const TileCoord t = tile_coord(pl, tile);
    build_tokens(g, pl, t.m0, tok, tid, pl.threads);
    for (int chunk = t.chunk_begin; chunk < t.chunk_end; ++chunk) {
      if (!resident) build_columns(g, pl, chunk, col, tid, pl.threads);
      __syncthreads();  // tables written; the previous chunk's product and tile's epilogue are done
      gather_a<T, V>(g, pl, tok, col, x, a, tid, pl.threads);
      if (!resident) gather_w(g, pl, chunk, t.n0, w, ws, tid, pl.threads);
      __syncthreads();
      mma_chunk(pl, a, ws, c, chunk == t.chunk_begin, tid);
    }
    __syncthreads();
    if (pl.partial)
      store_partial(g, pl, c, t, workspace, tid, pl.threads);
    else
      normalize_tile(g, pl, c, params, t.m0, args.eps, out, tid);
  }
}

// The norm pass of a split plan (args.plan is make_norm_plan's): per bm-row tile, the splits' sums added in
// order, then the fused plan's epilogue.
template <class T>
__global__ void __launch_bounds__(128, 4) patch_embed_norm_kernel(const KernelArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Geometry& g = args.g;
  const Plan& pl = args.plan;
  float* params = reinterpret_cast<float*>(smem + pl.off_params);
  float* c = reinterpret_cast<float*>(smem + pl.off_c);
  const int tid = threadIdx.x;
  const GlobalWriter<T> out{static_cast<T*>(args.out), args.out_vec4};
  const GlobalWorkspace workspace{args.workspace};
  load_block_params<T>(args, params, tid);
  for (int64_t tile = blockIdx.x; tile < pl.tiles; tile += gridDim.x) {
    const int64_t m0 = tile * pl.bm;
    __syncthreads();  // the previous tile's rows are normalized (and the parameters loaded)
    sum_partials(g, pl, workspace, m0, c, tid, pl.threads);
    __syncthreads();
    normalize_tile(g, pl, c, params, m0, args.eps, out, tid);
  }
}

// Per (kernel, device): the opt-in shared memory, raised only when a plan needs more than was set, and the
// resident blocks for each (threads, shared memory) a plan asks, queried once. Keyed by the kernel's
// address: every instantiation has the same function type, and the attribute and the occupancy belong to
// one function. Plans have few distinct shapes, so a short list per key is enough.
struct Residency {
  int threads, smem, blocks;
};

struct KernelState {
  int attribute_bytes = 0;
  std::vector<Residency> residency;
};

template <class Kernel>
cudaError_t resident_blocks(Kernel kernel, int threads, int smem, int& blocks_out) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelState> states;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  KernelState& state = states[{reinterpret_cast<const void*>(kernel), device}];
  if (smem > state.attribute_bytes) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    state.attribute_bytes = smem;
  }
  for (const Residency& r : state.residency)
    if (r.threads == threads && r.smem == smem) {
      blocks_out = r.blocks;
      return cudaSuccess;
    }
  int per_sm = 0, sms = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  state.residency.push_back({threads, smem, per_sm * sms});
  blocks_out = per_sm * sms;
  return cudaSuccess;
}

template <class Kernel>
cudaError_t launch_persistent(Kernel kernel, const KernelArgs& ka, cudaStream_t stream) {
  int blocks = 0;
  cudaError_t err = resident_blocks(kernel, ka.plan.threads, ka.plan.smem_bytes, blocks);
  if (err != cudaSuccess) return err;
  const int grid = static_cast<int>(ka.plan.tiles < blocks ? ka.plan.tiles : blocks);
  kernel<<<grid, ka.plan.threads, ka.plan.smem_bytes, stream>>>(ka);
  return cudaGetLastError();
}

template <class T, int V>
cudaError_t launch_typed(const LaunchArgs& a, const Plan& pl, cudaStream_t stream) {
  KernelArgs ka{};
  ka.g = a.g;
  ka.plan = pl;
  ka.x = a.x;
  ka.weight = a.weight;
  ka.bias = a.bias;
  ka.norm_weight = a.norm_weight;
  ka.norm_bias = a.norm_bias;
  ka.bias_stride = a.bias_stride;
  ka.norm_weight_stride = a.norm_weight_stride;
  ka.norm_bias_stride = a.norm_bias_stride;
  ka.out = a.out;
  ka.workspace = a.workspace;
  ka.eps = a.eps;
  ka.params_fp32 = a.params_fp32;
  ka.out_vec4 = a.g.Cout % 4 == 0 && reinterpret_cast<uintptr_t>(a.out) % (4 * sizeof(T)) == 0;
  if (pl.partial && a.workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = launch_persistent(patch_embed_kernel<T, V>, ka, stream);
  if (err != cudaSuccess || !pl.partial) return err;
  ka.plan = make_norm_plan(a.g, pl);
  return launch_persistent(patch_embed_norm_kernel<T>, ka, stream);
}

template <class T>
cudaError_t launch_vec(const LaunchArgs& a, const Plan& pl, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);  // nhwc: one 16-byte pixel chunk
  if (pl.vec == 1) return launch_typed<T, 1>(a, pl, stream);
  if (pl.vec == 4) return launch_typed<T, 4>(a, pl, stream);
  if (pl.vec == kWide) return launch_typed<T, kWide>(a, pl, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_patch_embed(const LaunchArgs& args, const Plan& pl, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return launch_vec<float>(args, pl, stream);
    case DType::kFloat16: return launch_vec<__half>(args, pl, stream);
    case DType::kBFloat16: return launch_vec<__nv_bfloat16>(args, pl, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace patch_embed
}  // namespace pvt_fast
