// Fused patch embedding: Conv2d(k, stride s, padding p) + bias, then LayerNorm over the output channels,
// written as tokens (B, Ho*Wo, Cout).
//
// This header holds everything a thread block does except the tensor-core instructions and the warp
// shuffles: the tiling plan, which input pixels and weights a tile reads, padding and tails, the
// output offsets, the CUDA-core dot products and the LayerNorm row math. Every function here compiles
// as plain C++ so that csrc/tests/patch_embed_host_test.cpp can run whole problems tile by tile on the
// host, one "thread id" at a time, with the same code the kernel runs.
//
// The conv is an implicit GEMM: C[m, n] = sum_kk A[m, kk] * Wt[n, kk], where
//   m  = (b, ho, wo) flattened, a token (M = B*Ho*Wo rows; the output row m starts at m * Cout),
//   n  = output channel (Cout columns, padded to npad, a multiple of 16),
//   kk = one (ci, kh, kw) tap, ordered (ci, kh, kw) for "nchw" input and (kh, kw, ci) for "nhwc", so
//        that consecutive kk are consecutive addresses of x in both layouts (K = Cin*k*k),
//   A[m, kk] = x[b, ci, ho*s - p + kh, wo*s - p + kw], zero outside the image (padding).
// With a fused plan a block owns bm consecutive tokens and all npad channels (LayerNorm needs the whole
// row); with a split plan it owns bm tokens x bn channels and a range of K, and a second kernel finishes
// the rows (see Plan). Either walks K in chunks of bk columns: per chunk it writes a column table (x
// offsets of each kk), gathers the A tile (bm x bk) and the weight tile (bn x bk) into shared memory and
// multiplies them into the fp32 tile C (bm x bn). The weight is read from a packed copy the op makes once
// per call: (Cout, kpad) in x's dtype, row n holding weight[n, tap(kk)] in kk order, zero past K
// (packed_pitch), so a weight tile is 16-byte loads of contiguous rows whatever the weight's layout or
// dtype. When the whole K fits ("resident" plan, one chunk), the weight tile is loaded once per block and
// the block loops over tiles.
// The epilogue adds the bias, normalizes each row in fp32 (two-pass mean and variance) and stores it in
// x's dtype (a split plan's tiles store their fp32 sums instead, and the norm pass runs this epilogue).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif

namespace pvt_fast {
namespace patch_embed {

enum class Layout : int { kNCHW = 0, kNHWC = 1 };

// An offset added to a pixel coordinate to mark a token (m >= M) or a column (kk >= K) as absent: any
// coordinate carrying it lands past the image, so the gather reads nothing and writes zero. Pixel
// coordinates, kernel sizes and padding stay below 2^28 (checked at the op boundary), so sums of two
// such values cannot overflow.
constexpr int32_t kAbsent = 1 << 29;
constexpr int kMaxCout = 1024;
constexpr int kMaxFragmentsPerWarp = 4;        // 16x16 fp32 accumulator tiles per warp
constexpr int kStreamedChunk = 64;             // widest bk when the whole K does not fit in shared memory
constexpr int kResidentSmemBytes = 110 * 1024; // keeps two resident blocks on an SM (228 KB)
constexpr int kMaxSmemBytes = 160 * 1024;      // under the per-block limit of sm_80 (163 KB) and sm_90

// Shapes and strides of one call. x's strides are in elements and indexed by logical dimension (batch,
// channel, row, column) whatever the memory layout, so any strided x is addressable.
struct Geometry {
  int64_t B, Cin, H, W, Cout;
  int64_t k, s, p;
  int64_t Ho, Wo, M, K;
  Layout layout;
  int64_t xs_b, xs_c, xs_h, xs_w;  // x
};

PE_HD int64_t conv_out_size(int64_t n, int64_t k, int64_t s, int64_t p) { return (n + 2 * p - k) / s + 1; }

inline Geometry make_geometry(int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t s,
                              int64_t p, Layout layout, const int64_t x_strides[4]) {
  Geometry g{};
  g.B = B; g.Cin = Cin; g.H = H; g.W = W; g.Cout = Cout;
  g.k = k; g.s = s; g.p = p;
  g.Ho = conv_out_size(H, k, s, p);
  g.Wo = conv_out_size(W, k, s, p);
  g.M = B * g.Ho * g.Wo;
  g.K = Cin * k * k;
  g.layout = layout;
  g.xs_b = x_strides[0]; g.xs_c = x_strides[1]; g.xs_h = x_strides[2]; g.xs_w = x_strides[3];
  return g;
}

// Row pitch, in elements, of the packed weight (Cout, kpad): K rounded up to 16, so every row starts
// 32-byte aligned (16 elements of 2 or 4 bytes) and a chunk's columns are whole 16-byte packs.
PE_HD int64_t packed_pitch(const Geometry& g) { return (g.K + 15) / 16 * 16; }

// The weight element packed column kk of row n holds: weight[n, ci, kh, kw] with (ci, kh, kw) in the
// layout's kk order ((ci, kh, kw) for "nchw", (kh, kw, ci) for "nhwc"). The op packs with the same order
// (an OIHW reshape, or an OHWI permute); the host test packs with this function.
struct WeightTap {
  int64_t ci, kh, kw;
};

// How a block is organised; computed on the host, passed to the kernel by value.
//
// Two kinds of plan. A fused plan (partial == false) gives a block bm tokens and all npad channels, so its
// epilogue normalizes whole rows and writes the tokens. A split plan (partial == true) is a plain implicit
// GEMM over bm x bn tiles whose K is cut into `splits` ranges of chunks_per_split chunks; each tile writes
// its fp32 sums to a workspace (splits, M, npad), and a second kernel, the norm pass (make_norm_plan), adds
// the splits in order, adds the bias and normalizes. A fused plan re-reads the whole weight for every bm
// tokens (bm is 32-128: the fp32 row tile must fit in shared memory) and has few tiles when M is small;
// a split plan reads a bn-row weight slice per tile and fills the SMs with splits, at the price of the
// workspace's round trip. make_plan picks the one plan_seconds predicts faster.
struct Plan {
  int warps, threads;
  int warps_m, warps_n;   // warp grid over the C tile: a warp owns rows [16*i, 16*i+16) and every
                          // warps_n-th 16-column block
  int bm, bn, npad;       // tokens and channels per tile; Cout rounded up to 16 (bn == npad when fused)
  int bk, chunks;         // columns per K chunk, number of chunks over the whole K
  int chunks_per_split, splits;  // a tile's K range: chunks [split * chunks_per_split, ...), at most chunks
  int vec;                // elements per x load: 1, 4 (nchw) or 16 bytes (nhwc); see choose_vec
  int lanes_per_row;      // epilogue: lanes cooperating on one LayerNorm row (power of two)
  int lda, ldw, ldc;      // shared-memory row pitches in elements
  int64_t row_tiles;      // ceil(M / bm)
  int col_blocks;         // ceil(npad / bn)
  int64_t tiles;          // row_tiles * col_blocks * splits
  bool partial;           // split plan: the tiles write fp32 sums to the workspace, the norm pass finishes
  // shared-memory carve-up, byte offsets
  int off_params, off_w, off_a, off_c, off_tok, off_col, smem_bytes;
};

struct TokenOrigin {
  int64_t x_base;  // offset of pixel (ih0, iw0) of image b, possibly outside the image
  int32_t ih0, iw0;  // top-left input pixel of the token's window (kAbsent when m >= M)
};

struct ColumnTap {
  int64_t x_delta;  // x offset of tap (ci, kh, kw) relative to a token's x_base
  int32_t dh, dw;   // kh, kw (kAbsent when kk >= K)
};

template <class T>
struct ElemTraits;  // to_float / from_float / zero; float below, half types in patch_embed.cu

template <>
struct ElemTraits<float> {
  PE_HD static float to_float(float v) { return v; }
  PE_HD static float from_float(float v) { return v; }
  PE_HD static float zero() { return 0.f; }
};

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

struct alignas(16) Float4 {
  float v[4];
};

PE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
PE_HD int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Widest x load every gather slot can use: V consecutive kk must be V consecutive, V-aligned elements
// that are all inside or all outside the image.
//   nchw: the V taps kw..kw+V-1 of one row: k, s, p and W multiples of 4, unit column stride, aligned rows.
//   nhwc: V channels of one pixel: Cin a multiple of V, unit channel stride, aligned pixels.
inline int choose_vec(const Geometry& g, int elem_size, uintptr_t x_address) {
  if (g.layout == Layout::kNCHW) {
    const int v = 4;
    bool ok = g.k % v == 0 && g.s % v == 0 && g.p % v == 0 && g.W % v == 0 && g.xs_w == 1 &&
              g.xs_h % v == 0 && g.xs_c % v == 0 && g.xs_b % v == 0 && x_address % (v * elem_size) == 0;
    return ok ? v : 1;
  }
  const int v = 16 / elem_size;
  bool ok = g.Cin % v == 0 && g.xs_c == 1 && g.xs_w % v == 0 && g.xs_h % v == 0 && g.xs_b % v == 0 &&
            x_address % 16 == 0;
  return ok ? v : 1;
}

inline int pow2_ceil(int v) {
  int r = 1;
  while (r < v) r *= 2;
  return r;
}

inline int pow2_floor(int v) {
  int r = 1;
  while (r * 2 <= v) r *= 2;
  return r;
}

inline int align128(int bytes) { return round_up(bytes, 128); }

// Split plans keep no LayerNorm parameters; the norm pass keeps only parameters and the C tile.
inline void carve_smem(Plan& pl, int elem_size) {
  int off = 0;
  pl.off_params = off; off = align128(off + (pl.partial ? 0 : 3 * pl.npad * 4));
  pl.off_w = off;      off = align128(off + pl.bn * pl.ldw * elem_size);
  pl.off_a = off;      off = align128(off + pl.bm * pl.lda * elem_size);
  pl.off_c = off;      off = align128(off + pl.bm * pl.ldc * 4);
  pl.off_tok = off;    off = align128(off + pl.bm * static_cast<int>(sizeof(TokenOrigin)));
  pl.off_col = off;    off = align128(off + pl.bk * static_cast<int>(sizeof(ColumnTap)));
  pl.smem_bytes = off;
}

inline void set_k_chunks(Plan& pl, const Geometry& g, int bk, int elem_size) {
  pl.bk = bk;
  pl.chunks = static_cast<int>(ceil_div(g.K, bk));
  pl.lda = pl.ldw = bk + 16 / elem_size;  // one 16-byte skew per row against bank conflicts
}

inline int lanes_for(int npad) { return pow2_floor(npad / 8 < 32 ? npad / 8 : 32); }

// Warps of the fused plan: 8 up to 128 channels, else 16 (the C tile's width needs the warps); make_plan
// also weighs 16 warps for narrow Cout, which doubles bm and halves the weight's re-reads.
inline int default_fused_warps(int npad) { return npad <= 128 ? 8 : 16; }

// Requires 1 <= Cout <= kMaxCout (checked at the op boundary). `max_smem` lowers the budgets below for
// GPUs with less shared memory per block (the plan may still exceed it for wide Cout: make_plan then
// takes a split plan). `warps`: 0 for default_fused_warps, else 8 or 16 (at least the default).
inline Plan make_fused_plan(const Geometry& g, int elem_size, int vec, int max_smem = kMaxSmemBytes, int warps = 0) {
  const int resident_budget = kResidentSmemBytes < max_smem ? kResidentSmemBytes : max_smem;
  const int streamed_budget = kMaxSmemBytes < max_smem ? kMaxSmemBytes : max_smem;
  Plan pl{};
  pl.npad = pl.bn = round_up(static_cast<int>(g.Cout), 16);
  const int col_tiles = pl.npad / 16;
  pl.warps = warps != 0 ? warps : default_fused_warps(pl.npad);
  pl.threads = 32 * pl.warps;
  pl.warps_n = pow2_ceil((col_tiles + kMaxFragmentsPerWarp - 1) / kMaxFragmentsPerWarp);
  pl.warps_m = pl.warps / pl.warps_n;
  pl.bm = 16 * pl.warps_m;
  pl.vec = vec;
  pl.lanes_per_row = lanes_for(pl.npad);
  pl.ldc = pl.npad + 4;
  pl.row_tiles = pl.tiles = ceil_div(g.M, pl.bm);
  pl.col_blocks = pl.splits = 1;
  // The whole K in one chunk when its tiles fit (checked in 64 bits first: K may be large).
  const int64_t whole_k = packed_pitch(g);
  const bool may_fit = whole_k * (pl.npad + pl.bm) * elem_size <= resident_budget;
  set_k_chunks(pl, g, may_fit ? static_cast<int>(whole_k) : kStreamedChunk, elem_size);
  carve_smem(pl, elem_size);
  // Otherwise stream K in the widest chunk that fits (wide Cout leaves less room for the weight tile).
  for (int bk = kStreamedChunk; pl.smem_bytes > resident_budget && bk >= 16; bk /= 2) {
    if (bk >= whole_k) continue;  // no smaller than the resident tiles
    set_k_chunks(pl, g, bk, elem_size);
    carve_smem(pl, elem_size);
    if (pl.smem_bytes <= streamed_budget) break;
  }
  pl.chunks_per_split = pl.chunks;
  return pl;
}

// The block shapes split plans may use: every one keeps 4 accumulator tiles per warp and threads % bm == 0.
struct SplitShape {
  int warps, bm, bn;
};
constexpr SplitShape kSplitShapes[] = {{4, 64, 64}, {8, 128, 64}, {8, 64, 128}, {16, 128, 128}, {16, 64, 256}};
constexpr int kSplitCounts[] = {1, 2, 3, 4, 6, 8};

// A split plan with `shape`'s tiles and K cut into about `want` ranges of whole chunks (fewer when K has
// fewer chunks). Requires shape.bn <= npad.
inline Plan make_split_plan(const Geometry& g, int elem_size, int vec, const SplitShape& shape, int want) {
  Plan pl{};
  pl.partial = true;
  pl.npad = round_up(static_cast<int>(g.Cout), 16);
  pl.warps = shape.warps;
  pl.threads = 32 * pl.warps;
  pl.bm = shape.bm;
  pl.bn = shape.bn;
  pl.warps_n = (pl.bn / 16 + kMaxFragmentsPerWarp - 1) / kMaxFragmentsPerWarp;
  pl.warps_m = pl.warps / pl.warps_n;
  pl.vec = vec;
  pl.lanes_per_row = lanes_for(pl.npad);
  pl.ldc = pl.bn + 4;
  const int64_t whole_k = packed_pitch(g);
  set_k_chunks(pl, g, whole_k < kStreamedChunk ? static_cast<int>(whole_k) : kStreamedChunk, elem_size);
  pl.chunks_per_split = static_cast<int>(ceil_div(pl.chunks, want));
  pl.splits = static_cast<int>(ceil_div(pl.chunks, pl.chunks_per_split));
  pl.row_tiles = ceil_div(g.M, pl.bm);
  pl.col_blocks = static_cast<int>(ceil_div(pl.npad, pl.bn));
  pl.tiles = pl.row_tiles * pl.col_blocks * pl.splits;
  carve_smem(pl, elem_size);
  return pl;
}

// The norm pass after a split plan: 4 warps, each normalizing rows_per_warp rows at a time from the
// workspace (params and an fp32 row tile in shared memory, as the fused epilogue).
inline Plan make_norm_plan(const Geometry& g, const Plan& split) {
  Plan pl{};
  pl.npad = pl.bn = split.npad;
  pl.warps = 4;
  pl.threads = 32 * pl.warps;
  pl.lanes_per_row = split.lanes_per_row;
  pl.bm = pl.warps * (32 / pl.lanes_per_row);
  pl.ldc = pl.npad + 4;
  pl.splits = split.splits;
  pl.row_tiles = pl.tiles = ceil_div(g.M, pl.bm);
  pl.col_blocks = 1;
  pl.off_params = 0;
  pl.off_c = align128(3 * pl.npad * 4);
  pl.smem_bytes = align128(pl.off_c + pl.bm * pl.ldc * 4);
  pl.off_w = pl.off_a = pl.off_tok = pl.off_col = pl.smem_bytes;
  return pl;
}

// --- choosing a plan: an H100 SXM estimate, mirrored in pvt_fast/kernels/patch_embed_cuda.py and checked
// there against the traffic model (pvt_fast/kernels/traffic.py, where the constants' sources are).
constexpr double kHbmBandwidth = 3.35e12, kL2Bandwidth = 5.5e12, kPeak16Bit = 989.4e12, kPeakFp32 = 66.9e12;
constexpr int kSms = 132, kSmemPerSm = 228 * 1024, kThreadsPerSm = 2048;

// Blocks resident at once on kSms SMs (the launcher asks the occupancy API of the device it runs on).
inline int64_t estimated_grid(const Plan& pl) {
  int per_sm = kSmemPerSm / (pl.smem_bytes + 1024);
  if (kThreadsPerSm / pl.threads < per_sm) per_sm = kThreadsPerSm / pl.threads;
  if (per_sm < 1) per_sm = 1;
  return pl.tiles < int64_t{per_sm} * kSms ? pl.tiles : int64_t{per_sm} * kSms;
}

// Sum over the outputs along one axis of the kernel taps that land inside the input.
inline int64_t valid_taps(int64_t size, int64_t out, int64_t k, int64_t s, int64_t p) {
  int64_t n = 0;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t i = o * s - p + kh;
      n += i >= 0 && i < size;
    }
  return n;
}

// x elements the gathers read for all tokens and all of K, once (padding is never read).
inline int64_t x_gather_elements(const Geometry& g) {
  return g.B * g.Cin * valid_taps(g.H, g.Ho, g.k, g.s, g.p) * valid_taps(g.W, g.Wo, g.k, g.s, g.p);
}

// Predicted seconds: max(HBM bytes / bandwidth, L2 bytes / bandwidth, FLOPs / peak), stretched when the
// blocks leave SMs idle, plus the norm pass of a split plan (HBM-bound, fills the GPU).
inline double plan_seconds(const Geometry& g, const Plan& pl, int elem_size, int64_t x_elements) {
  const double e = elem_size;
  const int64_t grid = estimated_grid(pl);
  const bool resident = !pl.partial && pl.chunks == 1;
  const double weight = static_cast<double>(g.Cout) * static_cast<double>(packed_pitch(g)) * e;
  const double weight_loads = static_cast<double>(resident ? grid : pl.row_tiles) * weight;
  const double tokens = static_cast<double>(g.M) * static_cast<double>(g.Cout) * e;
  const double written = pl.partial ? static_cast<double>(pl.splits) * static_cast<double>(g.M) * pl.npad * 4 : tokens;
  const double l2 = static_cast<double>(x_elements) * pl.col_blocks * e + weight_loads + written;
  const double hbm = static_cast<double>(g.B * g.Cin * g.H * g.W) * e + weight + written;
  const double flops = 2.0 * static_cast<double>(pl.row_tiles) * pl.col_blocks * pl.bm * pl.bn *
                       static_cast<double>(pl.chunks) * pl.bk;
  const double compute = flops / (elem_size == 4 ? kPeakFp32 : kPeak16Bit);
  double t = hbm / kHbmBandwidth;
  if (l2 / kL2Bandwidth > t) t = l2 / kL2Bandwidth;
  if (compute > t) t = compute;
  if (grid < kSms) t *= static_cast<double>(kSms) / static_cast<double>(grid);
  if (pl.partial) t += (written + tokens) / kHbmBandwidth;
  return t;
}

// Which plans make_plan weighs: all (kBest), only the fused plan, or only split plans (the fused plan
// when Cout is too narrow for any split shape). The op takes it from PVT_FAST_PATCH_EMBED_PLAN, so that
// tests on a GPU can run both kernels on the same problem.
enum class PlanKind : int { kBest = 0, kFused = 1, kSplit = 2 };

// The plan of `kind` predicted fastest, over the fused plans (default warps, then 16 warps where that
// differs) and the split plans of kSplitShapes x kSplitCounts whose shared memory fits `max_smem` (the
// device's opt-in limit: 99 KB on sm_86 / sm_89); ties keep the earlier candidate. The default fused plan
// when nothing fits (every Cout has a split plan under 60 KB, so only a limit below that, or a narrow
// Cout under kind kSplit, gets there).
inline Plan make_plan(const Geometry& g, int elem_size, int vec, PlanKind kind = PlanKind::kBest,
                      int max_smem = kMaxSmemBytes) {
  Plan best = make_fused_plan(g, elem_size, vec, max_smem);
  const int64_t x_elements = x_gather_elements(g);
  const int smem_limit = max_smem < kMaxSmemBytes ? max_smem : kMaxSmemBytes;
  double best_seconds = 1e300;
  auto consider = [&](const Plan& pl) {
    if (pl.smem_bytes > smem_limit) return;
    const double seconds = plan_seconds(g, pl, elem_size, x_elements);
    if (seconds < best_seconds) {
      best = pl;
      best_seconds = seconds;
    }
  };
  if (kind != PlanKind::kSplit) {
    const Plan fused = best;
    consider(fused);
    if (default_fused_warps(fused.npad) < 16) consider(make_fused_plan(g, elem_size, vec, max_smem, 16));
  }
  if (kind == PlanKind::kFused) return best;
  for (const SplitShape& shape : kSplitShapes) {
    if (shape.bn > best.npad) continue;
    int last_splits = 0;
    for (int want : kSplitCounts) {
      const Plan pl = make_split_plan(g, elem_size, vec, shape, want);
      if (pl.splits == last_splits) continue;
      last_splits = pl.splits;
      consider(pl);
    }
  }
  return best;
}

// Where tile `tile` of a plan sits: column blocks fastest, then row tiles, then splits, so the blocks that
// share an A tile run side by side.
struct TileCoord {
  int64_t m0;
  int n0, chunk_begin, chunk_end, split;
};

PE_HD TileCoord tile_coord(const Plan& pl, int64_t tile) {
  TileCoord t;
  const int64_t cb = tile % pl.col_blocks;
  const int64_t rest = tile / pl.col_blocks;
  t.m0 = rest % pl.row_tiles * pl.bm;
  t.split = static_cast<int>(rest / pl.row_tiles);
  t.n0 = static_cast<int>(cb) * pl.bn;
  t.chunk_begin = t.split * pl.chunks_per_split;
  t.chunk_end = t.chunk_begin + pl.chunks_per_split < pl.chunks ? t.chunk_begin + pl.chunks_per_split : pl.chunks;
  return t;
}

// ---------------------------------------------------------------------------------------------------
// Tables. Each function handles the entries i = tid, tid + threads, ...; the kernel calls it with
// threadIdx.x, the host test with every tid in turn.

PE_HD TokenOrigin token_origin(const Geometry& g, int64_t m) {
  TokenOrigin t;
  if (m >= g.M) {
    t.x_base = 0;
    t.ih0 = t.iw0 = kAbsent;
    return t;
  }
  const int64_t wo = m % g.Wo;
  const int64_t rest = m / g.Wo;
  const int64_t ho = rest % g.Ho;
  const int64_t b = rest / g.Ho;
  const int64_t ih0 = ho * g.s - g.p;
  const int64_t iw0 = wo * g.s - g.p;
  t.x_base = b * g.xs_b + ih0 * g.xs_h + iw0 * g.xs_w;
  t.ih0 = static_cast<int32_t>(ih0);
  t.iw0 = static_cast<int32_t>(iw0);
  return t;
}

// (ci, kh, kw) of column kk < K in the layout's order (see the file comment).
PE_HD WeightTap weight_tap(const Geometry& g, int64_t kk) {
  WeightTap t;
  if (g.layout == Layout::kNCHW) {
    t.ci = kk / (g.k * g.k);
    const int64_t r = kk - t.ci * g.k * g.k;
    t.kh = r / g.k;
    t.kw = r - t.kh * g.k;
  } else {
    const int64_t tap = kk / g.Cin;
    t.ci = kk - tap * g.Cin;
    t.kh = tap / g.k;
    t.kw = tap - t.kh * g.k;
  }
  return t;
}

PE_HD ColumnTap column_tap(const Geometry& g, int64_t kk) {
  ColumnTap c;
  if (kk >= g.K) {
    c.x_delta = 0;
    c.dh = c.dw = kAbsent;
    return c;
  }
  const WeightTap t = weight_tap(g, kk);
  c.x_delta = t.ci * g.xs_c + t.kh * g.xs_h + t.kw * g.xs_w;
  c.dh = static_cast<int32_t>(t.kh);
  c.dw = static_cast<int32_t>(t.kw);
  return c;
}

PE_HD void build_tokens(const Geometry& g, const Plan& pl, int64_t m0, TokenOrigin* tok, int tid, int nthreads) {
  for (int i = tid; i < pl.bm; i += nthreads) tok[i] = token_origin(g, m0 + i);
}

PE_HD void build_columns(const Geometry& g, const Plan& pl, int chunk, ColumnTap* col, int tid, int nthreads) {
  const int64_t k0 = static_cast<int64_t>(chunk) * pl.bk;
  for (int i = tid; i < pl.bk; i += nthreads) col[i] = column_tap(g, k0 + i);
}

// bias, LayerNorm weight and LayerNorm bias as fp32, zero past Cout. P is the parameters' storage type.
template <class P>
PE_HD void load_params(const Plan& pl, int64_t cout, const P* bias, const P* gamma, const P* beta,
                       int64_t stride_bias, int64_t stride_gamma, int64_t stride_beta, float* params, int tid,
                       int nthreads) {
  for (int i = tid; i < pl.npad; i += nthreads) {
    const bool in = i < cout;
    params[i] = in ? ElemTraits<P>::to_float(bias[i * stride_bias]) : 0.f;
    params[pl.npad + i] = in ? ElemTraits<P>::to_float(gamma[i * stride_gamma]) : 0.f;
    params[2 * pl.npad + i] = in ? ElemTraits<P>::to_float(beta[i * stride_beta]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------
// Gathers. Reader types give x / weight element access: the kernel reads global memory directly
// (GlobalReader), the host test checks every offset it is handed.

template <class T>
struct GlobalReader {
  const T* ptr;
  PE_HD T load(int64_t off) const { return ptr[off]; }
  template <int V>
  PE_HD Pack<T, V> load_pack(int64_t off) const { return *reinterpret_cast<const Pack<T, V>*>(ptr + off); }
};

template <class T, int V>
PE_HD Pack<T, V> zero_pack() {
  Pack<T, V> z;
  for (int i = 0; i < V; ++i) z.v[i] = ElemTraits<T>::zero();
  return z;
}

// Loads each thread has in flight in the gathers: a batch's loads all issue before its shared-memory
// stores, which wait for them (one load per store would cost a memory round trip per slot). Larger
// batches push the kernel past 128 registers (ptxas -v).
template <int Bytes>
constexpr int gather_batch() {
  return Bytes >= 16 ? 4 : 8;
}
constexpr int kWeightGatherBatch = 4;

// One gather slot: V consecutive columns starting at the column of `tap`, for token `t`. For V > 1,
// choose_vec guarantees the V elements are contiguous and all inside or all outside the image, so the
// first column decides for the whole pack.
template <class T, int V, class XReader>
PE_HD Pack<T, V> load_slot(const Geometry& g, const TokenOrigin& t, const ColumnTap& tap, const XReader& x) {
  const int32_t ih = t.ih0 + tap.dh, iw = t.iw0 + tap.dw;
  const bool in = static_cast<uint32_t>(ih) < static_cast<uint32_t>(g.H) &&
                  static_cast<uint32_t>(iw) < static_cast<uint32_t>(g.W);
  if (!in) return zero_pack<T, V>();
  const int64_t off = t.x_base + tap.x_delta;
  if constexpr (V > 1) {
    return x.template load_pack<V>(off);
  } else {
    Pack<T, 1> p;
    p.v[0] = x.load(off);
    return p;
  }
}

// The A tile (bm x bk, pitch lda), in slots of V columns. Coalescing decides which index the lanes
// walk: for nchw consecutive lanes take consecutive tokens (neighbouring tokens read neighbouring
// columns of an image row), for nhwc consecutive slots (channels of one pixel are contiguous). nchw
// needs threads % bm == 0.
template <class T, int V, class XReader>
PE_HD void gather_a(const Geometry& g, const Plan& pl, const TokenOrigin* tok, const ColumnTap* col,
                    const XReader& x, T* a, int tid, int nthreads) {
  constexpr int kBatch = gather_batch<V * sizeof(T)>();
  const int slots = pl.bk / V;
  Pack<T, V> v[kBatch];
  if (g.layout == Layout::kNCHW) {
    const int m = tid % pl.bm;
    const int step = nthreads / pl.bm;
    const TokenOrigin t = tok[m];
    T* a_row = a + m * pl.lda;
    for (int cv0 = tid / pl.bm; cv0 < slots; cv0 += kBatch * step) {
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int cv = cv0 + b * step;
        v[b] = cv < slots ? load_slot<T, V>(g, t, col[cv * V], x) : zero_pack<T, V>();
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int cv = cv0 + b * step;
        if (cv < slots) *reinterpret_cast<Pack<T, V>*>(a_row + cv * V) = v[b];
      }
    }
  } else {
    const int total = pl.bm * slots;
    for (int e0 = tid; e0 < total; e0 += kBatch * nthreads) {
      int dst[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int e = e0 + b * nthreads;
        dst[b] = -1;
        if (e < total) {
          const int m = e / slots;
          const int cv = e - m * slots;
          dst[b] = m * pl.lda + cv * V;
          v[b] = load_slot<T, V>(g, tok[m], col[cv * V], x);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (dst[b] >= 0) *reinterpret_cast<Pack<T, V>*>(a + dst[b]) = v[b];
    }
  }
}

// The weight tile of chunk `chunk` for channels n0.. (bn x bk, pitch ldw) from the packed weight (Cout,
// pitch, see packed_pitch): row r, column c holds packed[n0 + r, chunk * bk + c], zero past Cout and past
// the pitch, in 16-byte packs (bk, the pitch and ldw are multiples of 16 bytes' worth of elements).
// Consecutive threads take consecutive packs of a row: coalesced.
template <class T, class WReader>
PE_HD void gather_w(const Geometry& g, const Plan& pl, int chunk, int n0, const WReader& w, T* ws, int tid,
                    int nthreads) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int kBatch = kWeightGatherBatch;
  const int64_t pitch = packed_pitch(g);
  const int64_t k0 = static_cast<int64_t>(chunk) * pl.bk;
  const int packs = pl.bk / V;
  const int total = pl.bn * packs;
  Pack<T, V> v[kBatch];
  for (int e0 = tid; e0 < total; e0 += kBatch * nthreads) {
    int dst[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int e = e0 + b * nthreads;
      dst[b] = -1;
      v[b] = zero_pack<T, V>();
      if (e < total) {
        const int r = e / packs;
        const int cv = e - r * packs;
        const int64_t n = n0 + r;
        dst[b] = r * pl.ldw + cv * V;
        if (n < g.Cout && k0 + cv * V < pitch) v[b] = w.template load_pack<V>(n * pitch + k0 + cv * V);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (dst[b] >= 0) *reinterpret_cast<Pack<T, V>*>(ws + dst[b]) = v[b];
  }
}

// ---------------------------------------------------------------------------------------------------
// Per-tile math.

// C (+)= A * Wt^T over one chunk on CUDA cores, fp32 accumulation; each thread owns 4x4 blocks of C.
// Used for fp32 inputs (exact fp32 products) and where tensor cores are unavailable.
template <class T>
PE_HD void simt_mma_chunk(const Plan& pl, const T* a, const T* ws, float* c, bool first, int tid, int nthreads) {
  const int row_blocks = pl.bm / 4;
  const int blocks = row_blocks * (pl.bn / 4);
  for (int u = tid; u < blocks; u += nthreads) {
    const int r0 = (u % row_blocks) * 4;
    const int n0 = (u / row_blocks) * 4;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = first ? 0.f : c[(r0 + i) * pl.ldc + n0 + j];
    for (int kk = 0; kk < pl.bk; ++kk) {
      float av[4], wv[4];
      for (int i = 0; i < 4; ++i) av[i] = ElemTraits<T>::to_float(a[(r0 + i) * pl.lda + kk]);
      for (int j = 0; j < 4; ++j) wv[j] = ElemTraits<T>::to_float(ws[(n0 + j) * pl.ldw + kk]);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * wv[j];
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) c[(r0 + i) * pl.ldc + n0 + j] = acc[i][j];
  }
}

// Four consecutive floats of a C row or of the parameters: 16-byte aligned (ldc and npad are multiples
// of 4, the regions 128-byte aligned), so one shared-memory load.
PE_HD Float4 load_float4(const float* p) { return *reinterpret_cast<const Float4*>(p); }

// LayerNorm of one C row (conv output before the bias), done by `lanes` cooperating lanes; lane `lane`
// owns the 4-column groups lane, lane + lanes, ... The caller sums the partials over the lanes.
PE_HD float row_partial_sum(const float* c_row, const float* bias, int64_t cout, int npad, int lane, int lanes) {
  float s = 0.f;
  for (int j0 = 4 * lane; j0 < npad; j0 += 4 * lanes) {
    const Float4 v = load_float4(c_row + j0), b = load_float4(bias + j0);
    for (int q = 0; q < 4; ++q)
      if (j0 + q < cout) s += v.v[q] + b.v[q];
  }
  return s;
}

PE_HD float row_partial_sqdev(const float* c_row, const float* bias, int64_t cout, int npad, float mean, int lane,
                              int lanes) {
  float s = 0.f;
  for (int j0 = 4 * lane; j0 < npad; j0 += 4 * lanes) {
    const Float4 v = load_float4(c_row + j0), b = load_float4(bias + j0);
    for (int q = 0; q < 4; ++q) {
      const float d = v.v[q] + b.v[q] - mean;
      if (j0 + q < cout) s += d * d;
    }
  }
  return s;
}

// Writes y = (c + bias - mean) * rstd * gamma + beta for this lane's groups of output row `out_row`
// (element offset of the token's first channel). Writer::store(off, values, count) stores count <= 4
// consecutive values converted to the output type.
template <class Writer>
PE_HD void row_store(const float* c_row, const float* params, int64_t cout, int npad, float mean, float rstd,
                     int lane, int lanes, int64_t out_row, const Writer& out) {
  const float* bias = params;
  const float* gamma = params + npad;
  const float* beta = params + 2 * npad;
  for (int j0 = 4 * lane; j0 < cout; j0 += 4 * lanes) {
    const Float4 v = load_float4(c_row + j0), b = load_float4(bias + j0);
    const Float4 w = load_float4(gamma + j0), o = load_float4(beta + j0);
    float y[4];
    for (int q = 0; q < 4; ++q) y[q] = (v.v[q] + b.v[q] - mean) * rstd * w.v[q] + o.v[q];
    const int64_t left = cout - j0;
    out.store(out_row + j0, y, left < 4 ? static_cast<int>(left) : 4);
  }
}

// A split plan's tile C (bm x bn, fp32) into the workspace (splits, M, npad): rows m < M, columns n < npad,
// in float4s (bn, npad and ldc are multiples of 4). Writer::store4(off, value) writes one Float4.
template <class Writer>
PE_HD void store_partial(const Geometry& g, const Plan& pl, const float* c, const TileCoord& t, const Writer& ws,
                         int tid, int nthreads) {
  const int groups = pl.bn / 4;
  for (int i = tid; i < pl.bm * groups; i += nthreads) {
    const int r = i / groups;
    const int j = (i - r * groups) * 4;
    const int64_t m = t.m0 + r;
    if (m < g.M && t.n0 + j < pl.npad)
      ws.store4((static_cast<int64_t>(t.split) * g.M + m) * pl.npad + t.n0 + j, load_float4(c + r * pl.ldc + j));
  }
}

// The norm pass's row tile: C[r, :] = sum over splits, in split order, of workspace row m0 + r (zero past
// M), so the result does not depend on which block ran first. Reader::load4(off) reads one Float4.
template <class Reader>
PE_HD void sum_partials(const Geometry& g, const Plan& pl, const Reader& ws, int64_t m0, float* c, int tid,
                        int nthreads) {
  const int groups = pl.npad / 4;
  for (int i = tid; i < pl.bm * groups; i += nthreads) {
    const int r = i / groups;
    const int j = (i - r * groups) * 4;
    const int64_t m = m0 + r;
    Float4 acc = {{0.f, 0.f, 0.f, 0.f}};
    if (m < g.M)
      for (int s = 0; s < pl.splits; ++s) {
        const Float4 v = ws.load4((static_cast<int64_t>(s) * g.M + m) * pl.npad + j);
        for (int q = 0; q < 4; ++q) acc.v[q] += v.v[q];
      }
    *reinterpret_cast<Float4*>(c + r * pl.ldc + j) = acc;
  }
}

// The workspace in global memory (16-byte aligned: npad is a multiple of 16).
struct GlobalWorkspace {
  float* ptr;
  PE_HD void store4(int64_t off, const Float4& v) const { *reinterpret_cast<Float4*>(ptr + off) = v; }
  PE_HD Float4 load4(int64_t off) const { return *reinterpret_cast<const Float4*>(ptr + off); }
};

// Stores into the (M, Cout) token matrix; `vec4` when 4 consecutive outputs of a row may be stored as
// one aligned pack (Cout % 4 == 0 and an aligned base pointer).
template <class T>
struct GlobalWriter {
  T* ptr;
  bool vec4;
  PE_HD void store(int64_t off, const float* y, int count) const {
    if (vec4 && count == 4) {
      Pack<T, 4> p;
      for (int q = 0; q < 4; ++q) p.v[q] = ElemTraits<T>::from_float(y[q]);
      *reinterpret_cast<Pack<T, 4>*>(ptr + off) = p;
      return;
    }
    for (int q = 0; q < 4; ++q)  // constant trip count keeps y in registers
      if (q < count) ptr[off + q] = ElemTraits<T>::from_float(y[q]);
  }
};

}  // namespace patch_embed
}  // namespace pvt_fast
