// Host test of the patch-embedding kernel's core (csrc/patch_embed_core.h): runs whole problems through
// the same table, gather, product and LayerNorm functions the CUDA kernel calls, block by block, tile by
// tile and thread id by thread id, in the kernel's order, and checks
//   - every x and weight read is inside its tensor and aligned for its width (padding is never read),
//   - every output element is written exactly once,
//   - the values match an independent double-precision conv + bias + LayerNorm,
// for v1 and v2 geometries, both layouts, odd sizes and tails, generic strides, fp32 and bf16 storage.
// Shared memory is poisoned with NaN before each problem, so a tile entry the gathers forget shows up.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "patch_embed_core.h"

namespace pe = pvt_fast::patch_embed;

// bf16 storage on the host: bits only, round-to-nearest-even from float.
struct HostBf16 {
  uint16_t bits;
};

template <>
struct pe::ElemTraits<HostBf16> {
  static float to_float(HostBf16 v) {
    uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static HostBf16 from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return HostBf16{0x7fc0};
    u += 0x7fff + ((u >> 16) & 1);
    return HostBf16{static_cast<uint16_t>(u >> 16)};
  }
  static HostBf16 zero() { return HostBf16{0}; }
};

template <class T>
float to_f(T v) { return pe::ElemTraits<T>::to_float(v); }
template <class T>
T from_f(float v) { return pe::ElemTraits<T>::from_float(v); }

static int g_failures = 0;

#define EXPECT(cond, ...)                                           \
  do {                                                              \
    if (!(cond)) {                                                  \
      ++g_failures;                                                 \
      std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
      return false;                                                 \
    }                                                               \
  } while (0)

// Reads element `off` of a tensor spanning `span` elements; records the first bad access and counts the
// elements read (the traffic model's byte counts are checked against these, see --traffic).
template <class T>
struct CheckedReader {
  const T* ptr;
  int64_t span;
  std::string* error;
  int64_t* loaded;
  void check(int64_t off, int width) const {
    *loaded += width;
    if (!error->empty()) return;
    if (off < 0 || off + width > span)
      *error = "read [" + std::to_string(off) + ", " + std::to_string(off + width) + ") outside [0, " +
               std::to_string(span) + ")";
    else if (reinterpret_cast<uintptr_t>(ptr + off) % (width * sizeof(T)) != 0)
      *error = "read of " + std::to_string(width) + " elements at " + std::to_string(off) + " is misaligned";
  }
  T load(int64_t off) const {
    check(off, 1);
    return (off >= 0 && off < span) ? ptr[off] : from_f<T>(NAN);
  }
  template <int V>
  pe::Pack<T, V> load_pack(int64_t off) const {
    check(off, V);
    pe::Pack<T, V> p;
    for (int i = 0; i < V; ++i) p.v[i] = (off + i >= 0 && off + i < span) ? ptr[off + i] : from_f<T>(NAN);
    return p;
  }
};

// Stores outputs (rounded to T) and counts writes per element.
template <class T>
struct CountingWriter {
  float* values;
  int* writes;
  int64_t size;
  std::string* error;
  void store(int64_t off, const float* y, int count) const {
    for (int q = 0; q < count; ++q) {
      if (off + q < 0 || off + q >= size) {
        if (error->empty()) *error = "write at " + std::to_string(off + q) + " outside the output";
        continue;
      }
      values[off + q] = to_f(from_f<T>(y[q]));
      ++writes[off + q];
    }
  }
};

struct Problem {
  const char* name;
  int64_t B, Cin, H, W, Cout, k, s, p;
  pe::Layout layout;
  bool odd_strides;  // x and weight stored in the other memory order, with gaps (generic strides)
  int expect_vec;              // the vector width choose_vec must pick
};

// Strides of a tensor of logical `sizes` stored in memory in `order` (outermost first), with `gap`
// unused elements after every innermost run (as in a slice of a wider tensor).
struct Strided {
  int64_t strides[4];
  int64_t span;
};

static Strided make_strides(const int64_t sizes[4], const int order[4], int64_t gap) {
  Strided s{};
  int64_t step = 1;
  for (int i = 3; i >= 0; --i) {
    s.strides[order[i]] = step;
    step *= sizes[order[i]];
    if (i == 3) step += gap;
  }
  s.span = step;
  return s;
}

static double ref_value(const Problem& pr, const pe::Geometry& g, const Strided& ws, const std::vector<double>& x,
                        const std::vector<double>& w, int64_t b, int64_t ho, int64_t wo, int64_t co) {
  double acc = 0;
  for (int64_t ci = 0; ci < pr.Cin; ++ci)
    for (int64_t kh = 0; kh < pr.k; ++kh)
      for (int64_t kw = 0; kw < pr.k; ++kw) {
        const int64_t ih = ho * pr.s - pr.p + kh, iw = wo * pr.s - pr.p + kw;
        if (ih < 0 || ih >= pr.H || iw < 0 || iw >= pr.W) continue;
        acc += x[b * g.xs_b + ci * g.xs_c + ih * g.xs_h + iw * g.xs_w] *
               w[co * ws.strides[0] + ci * ws.strides[1] + kh * ws.strides[2] + kw * ws.strides[3]];
      }
  return acc;
}

// The invariants the kernels rely on (see gather_a, tensor_core_chunk, tile_coord, normalize_tile).
static bool check_plan(const pe::Geometry& g, const pe::Plan& pl, int vec, int es, const std::string& name) {
  EXPECT(pl.warps_m * pl.warps_n == pl.warps && pl.threads == 32 * pl.warps && pl.bm == 16 * pl.warps_m,
         "%s: warp grid %dx%d for %d warps", name.c_str(), pl.warps_m, pl.warps_n, pl.warps);
  EXPECT(pl.npad >= g.Cout && pl.npad % 16 == 0 && pl.bn % 16 == 0 && pl.bn <= pl.npad &&
             (pl.partial || pl.bn == pl.npad) && (pl.bn / 16 + pl.warps_n - 1) / pl.warps_n <= pe::kMaxFragmentsPerWarp,
         "%s: bn %d of npad %d needs more than %d fragments per warp", name.c_str(), pl.bn, pl.npad,
         pe::kMaxFragmentsPerWarp);
  EXPECT(pl.threads % pl.bm == 0 && pl.bm % (32 / pl.lanes_per_row) == 0 && pl.lanes_per_row >= 1 &&
             pl.lanes_per_row <= 32 && (pl.lanes_per_row & (pl.lanes_per_row - 1)) == 0,
         "%s: bm %d, lanes per row %d", name.c_str(), pl.bm, pl.lanes_per_row);
  EXPECT(pl.bk % 16 == 0 && pl.bk % vec == 0 && static_cast<int64_t>(pl.chunks) * pl.bk >= g.K &&
             static_cast<int64_t>(pl.chunks - 1) * pl.bk < g.K && pl.lda * es % 16 == 0 && pl.ldw * es % 16 == 0 &&
             pl.ldc % 4 == 0 && pl.ldc >= pl.bn,
         "%s: bk %d, chunks %d, K %lld", name.c_str(), pl.bk, pl.chunks, (long long)g.K);
  EXPECT(pl.chunks_per_split >= 1 && pl.splits * pl.chunks_per_split >= pl.chunks &&
             (pl.splits - 1) * pl.chunks_per_split < pl.chunks && (pl.partial || pl.splits == 1) &&
             pl.row_tiles * pl.bm >= g.M && (pl.row_tiles - 1) * pl.bm < g.M &&
             pl.col_blocks * pl.bn >= pl.npad && (pl.col_blocks - 1) * pl.bn < pl.npad &&
             pl.tiles == pl.row_tiles * pl.col_blocks * pl.splits,
         "%s: %d splits of %d chunks, %lld x %d x %d tiles", name.c_str(), pl.splits, pl.chunks_per_split,
         (long long)pl.row_tiles, pl.col_blocks, pl.splits);
  EXPECT(pl.smem_bytes <= pe::kMaxSmemBytes &&
             pl.off_w % 128 == 0 && pl.off_a % 128 == 0 && pl.off_c % 128 == 0,
         "%s: plan needs %d bytes of shared memory", name.c_str(), pl.smem_bytes);
  // Each region holds what the kernel puts there (the emulation uses separate buffers, so it cannot tell).
  const int tok_bytes = pl.bm * static_cast<int>(sizeof(pe::TokenOrigin));
  const int col_bytes = pl.bk * static_cast<int>(sizeof(pe::ColumnTap));
  EXPECT(pl.off_params == 0 && pl.off_w - pl.off_params >= (pl.partial ? 0 : 3 * pl.npad * 4) &&
             pl.off_a - pl.off_w >= pl.bn * pl.ldw * es && pl.off_c - pl.off_a >= pl.bm * pl.lda * es &&
             pl.off_tok - pl.off_c >= pl.bm * pl.ldc * 4 && pl.off_col - pl.off_tok >= tok_bytes &&
             pl.off_tok % 8 == 0 && pl.off_col % 8 == 0 && pl.smem_bytes - pl.off_col >= col_bytes,
         "%s: shared-memory regions overlap (params %d, w %d, a %d, c %d, tok %d, col %d, end %d)", name.c_str(),
         pl.off_params, pl.off_w, pl.off_a, pl.off_c, pl.off_tok, pl.off_col, pl.smem_bytes);
  if (pl.partial) {
    const pe::Plan np = pe::make_norm_plan(g, pl);
    EXPECT(np.bm % (32 / np.lanes_per_row) == 0 && np.ldc % 4 == 0 && np.off_c % 128 == 0 &&
               np.off_c - np.off_params >= 3 * np.npad * 4 && np.smem_bytes - np.off_c >= np.bm * np.ldc * 4 &&
               np.smem_bytes <= 48 * 1024 && np.tiles * np.bm >= g.M && np.splits == pl.splits &&
               np.threads == 32 * np.warps && np.bm == np.warps * (32 / np.lanes_per_row),
           "%s: norm plan bm %d, %d bytes", name.c_str(), np.bm, np.smem_bytes);
  }
  return true;
}

// Every plan make_plan may choose (the fused plan and every split candidate), for every Cout the op
// accepts, small to large K, both element sizes.
static void sweep_plans() {
  int plans = 0, before = g_failures;
  const int64_t unit[4] = {1, 1, 1, 1};
  for (int64_t cout = 1; cout <= pe::kMaxCout; ++cout)
    for (int64_t cin : {int64_t{1}, int64_t{3}, int64_t{64}, int64_t{320}, int64_t{1024}, int64_t{1} << 26})
      for (int64_t k : {1, 2, 3, 4, 7})
        for (int es : {2, 4}) {
          const pe::Geometry g = pe::make_geometry(1, cin, 8, 8, cout, k, 1, 0, pe::Layout::kNHWC, unit);
          const std::string name = "sweep Cout " + std::to_string(cout) + " K " + std::to_string(g.K);
          ++plans;
          if (!check_plan(g, pe::make_fused_plan(g, es, 1), 1, es, name)) return;
          const pe::Plan wide = pe::make_fused_plan(g, es, 1, pe::kMaxSmemBytes, 16);  // make_plan skips it if too big
          if (wide.smem_bytes <= pe::kMaxSmemBytes && !check_plan(g, wide, 1, es, name + " 16 warps")) return;
          for (const pe::SplitShape& shape : pe::kSplitShapes)
            for (int want : pe::kSplitCounts) {
              if (shape.bn > (cout + 15) / 16 * 16) continue;
              const pe::Plan pl = pe::make_split_plan(g, es, 1, shape, want);
              ++plans;
              if (pl.smem_bytes <= pe::kMaxSmemBytes && !check_plan(g, pl, 1, es, name + " split")) return;
            }
          if (!check_plan(g, pe::make_plan(g, es, 1), 1, es, name + " chosen")) return;
          // An sm_86 / sm_89 GPU (99 KB per block): the chosen plan fits it.
          const pe::Plan small = pe::make_plan(g, es, 1, pe::PlanKind::kBest, 99 * 1024);
          if (small.smem_bytes > 99 * 1024) {
            ++g_failures;
            std::printf("  FAIL %s: the plan for 99 KB needs %d bytes\n", name.c_str(), small.smem_bytes);
            return;
          }
          if (!check_plan(g, small, 1, es, name + " chosen for 99 KB")) return;
        }
  if (g_failures == before)
    std::printf("  ok  %d plans (Cout 1..%d, K 1..%lld, 2- and 4-byte elements)\n", plans, pe::kMaxCout,
                (long long)(int64_t{49} << 26));
}

// Elements each tensor is read or written by a whole problem (every block, every thread).
struct Traffic {
  int64_t x = 0, weight = 0, out = 0, workspace_stored = 0, workspace_loaded = 0;
};

// A split plan's fp32 workspace: every access in range and 4-aligned, writes counted per element, elements
// moved counted for the traffic check. Poisoned with NaN, so a sum the norm pass reads unwritten shows up.
struct CheckedWorkspace {
  float* values;
  int* writes;
  int64_t size;
  std::string* error;
  Traffic* traffic;
  bool bad(int64_t off) const {
    if (off >= 0 && off + 4 <= size && off % 4 == 0) return false;
    if (error->empty()) *error = "workspace access at " + std::to_string(off) + " outside or misaligned";
    return true;
  }
  void store4(int64_t off, const pe::Float4& v) const {
    traffic->workspace_stored += 4;
    if (bad(off)) return;
    for (int q = 0; q < 4; ++q) {
      values[off + q] = v.v[q];
      ++writes[off + q];
    }
  }
  pe::Float4 load4(int64_t off) const {
    traffic->workspace_loaded += 4;
    pe::Float4 v = {{NAN, NAN, NAN, NAN}};
    if (!bad(off))
      for (int q = 0; q < 4; ++q) v.v[q] = values[off + q];
    return v;
  }
};

// The kernels' epilogue (normalize_tile) on one tile: warp w, lane l handles row r0 + l / lanes with r0 =
// w * rows_per_warp, w * rows_per_warp + warps * rows_per_warp, ...; the lanes of a row add their partials.
template <class Writer>
static void emulate_epilogue(const pe::Geometry& g, const pe::Plan& pl, const float* c, const float* params,
                             int64_t m0, float eps, const Writer& writer) {
  const int lanes = pl.lanes_per_row, rows_per_warp = 32 / lanes;
  for (int warp = 0; warp < pl.warps; ++warp)
    for (int r0 = warp * rows_per_warp; r0 < pl.bm; r0 += pl.warps * rows_per_warp)
      for (int lr = 0; lr < rows_per_warp; ++lr) {
        const int r = r0 + lr;
        const float* c_row = c + r * pl.ldc;
        float s = 0, q = 0;
        for (int sub = 0; sub < lanes; ++sub) s += pe::row_partial_sum(c_row, params, g.Cout, pl.npad, sub, lanes);
        const float mean = s / static_cast<float>(g.Cout);
        for (int sub = 0; sub < lanes; ++sub)
          q += pe::row_partial_sqdev(c_row, params, g.Cout, pl.npad, mean, sub, lanes);
        const float rstd = 1.f / std::sqrt(q / static_cast<float>(g.Cout) + eps);
        const int64_t m = m0 + r;
        if (m < g.M)
          for (int sub = 0; sub < lanes; ++sub)
            pe::row_store(c_row, params, g.Cout, pl.npad, mean, rstd, sub, lanes, m * g.Cout, writer);
      }
}

static int round_up_16(int64_t v) { return static_cast<int>((v + 15) / 16 * 16); }

// Which plan a run uses: make_plan's, the fused plan, or the split plan of `shape` with about `splits` splits.
struct PlanChoice {
  enum Kind { kChosen, kFused, kFused16, kSplit } kind = kChosen;
  pe::SplitShape shape{};
  int splits = 1;
  pe::Plan make(const pe::Geometry& g, int es, int vec) const {
    if (kind == kFused) return pe::make_fused_plan(g, es, vec);
    if (kind == kFused16) return pe::make_fused_plan(g, es, vec, pe::kMaxSmemBytes, 16);
    if (kind == kSplit) return pe::make_split_plan(g, es, vec, shape, splits);
    return pe::make_plan(g, es, vec);
  }
};

// Runs one problem with x stored as T (weights stored as float with the problem's strides, packed and
// rounded to T as the op does) on `grid` emulated blocks per kernel (at most the kernel's tiles), with the
// plan `choice` names; returns false on the first failure.
template <class T, int V>
static bool run_problem(const Problem& pr, int grid, double tol, uint32_t seed, Traffic* traffic = nullptr,
                        const PlanChoice& choice = PlanChoice{}) {
  const int64_t x_sizes[4] = {pr.B, pr.Cin, pr.H, pr.W};  // logical b, c, h, w
  // Memory order of x: nchw -> b,c,h,w; nhwc -> b,h,w,c; odd_strides swaps to the other.
  const bool nhwc_memory = (pr.layout == pe::Layout::kNHWC) != pr.odd_strides;
  const int x_order_nchw[4] = {0, 1, 2, 3}, x_order_nhwc[4] = {0, 2, 3, 1};
  const Strided xs = make_strides(x_sizes, nhwc_memory ? x_order_nhwc : x_order_nchw, pr.odd_strides ? 3 : 0);
  const int64_t w_sizes[4] = {pr.Cout, pr.Cin, pr.k, pr.k};
  const Strided wst = make_strides(w_sizes, pr.odd_strides ? x_order_nhwc : x_order_nchw, pr.odd_strides ? 1 : 0);
  const pe::Geometry g = pe::make_geometry(pr.B, pr.Cin, pr.H, pr.W, pr.Cout, pr.k, pr.s, pr.p, pr.layout,
                                           xs.strides);

  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<T> x(xs.span);
  std::vector<double> x_ref(xs.span);
  for (int64_t i = 0; i < xs.span; ++i) {
    x[i] = from_f<T>(normal(rng));
    x_ref[i] = to_f(x[i]);
  }
  std::vector<float> w(wst.span);
  std::vector<double> w_ref(wst.span);
  for (int64_t i = 0; i < wst.span; ++i) {
    w[i] = normal(rng) * 0.3f;
    w_ref[i] = to_f(from_f<T>(w[i]));  // the kernel multiplies in T
  }
  std::vector<float> bias(pr.Cout), gamma(pr.Cout), beta(pr.Cout);
  for (int64_t i = 0; i < pr.Cout; ++i) {
    bias[i] = normal(rng) * 0.5f;
    gamma[i] = 1.f + 0.2f * normal(rng);
    beta[i] = 0.1f * normal(rng);
  }
  const float eps = 1e-5f;

  const int vec = pe::choose_vec(g, sizeof(T), reinterpret_cast<uintptr_t>(x.data()));
  EXPECT(vec == pr.expect_vec, "%s: choose_vec picked %d, expected %d", pr.name, vec, pr.expect_vec);
  EXPECT(vec == V, "%s: instantiated with V=%d but the plan wants %d", pr.name, V, vec);
  const pe::Plan pl = choice.make(g, sizeof(T), vec);
  if (!check_plan(g, pl, V, sizeof(T), pr.name)) return false;

  // The op's packing (patch_embed_op.cpp pack_weight): row n, column kk = weight[n, weight_tap(kk)] in T.
  const int64_t pitch = pe::packed_pitch(g);
  std::vector<T> packed(pr.Cout * pitch, from_f<T>(0.f));
  for (int64_t n = 0; n < pr.Cout; ++n)
    for (int64_t kk = 0; kk < g.K; ++kk) {
      const pe::WeightTap t = pe::weight_tap(g, kk);
      packed[n * pitch + kk] =
          from_f<T>(w[n * wst.strides[0] + t.ci * wst.strides[1] + t.kh * wst.strides[2] + t.kw * wst.strides[3]]);
    }

  std::string read_error, write_error;
  Traffic counted;
  const CheckedReader<T> xr{x.data(), xs.span, &read_error, &counted.x};
  const CheckedReader<T> wr{packed.data(), pr.Cout * pitch, &read_error, &counted.weight};
  std::vector<float> out(g.M * g.Cout, NAN);
  std::vector<int> writes(g.M * g.Cout, 0);
  const CountingWriter<T> writer{out.data(), writes.data(), g.M * g.Cout, &write_error};

  const int64_t ws_size = pl.partial ? pl.splits * g.M * pl.npad : 0;
  std::vector<float> workspace(ws_size, NAN);
  std::vector<int> ws_writes(ws_size, 0);
  const CheckedWorkspace wsp{workspace.data(), ws_writes.data(), ws_size, &write_error, &counted};

  const int nt = pl.threads;
  const int conv_grid = static_cast<int>(grid <= 0 || grid > pl.tiles ? pl.tiles : grid);
  for (int block = 0; block < conv_grid; ++block) {
    // This block's shared memory, poisoned.
    std::vector<float> params(3 * pl.npad, NAN);
    std::vector<T> ws(pl.bn * pl.ldw, from_f<T>(NAN)), a(pl.bm * pl.lda, from_f<T>(NAN));
    std::vector<float> c(pl.bm * pl.ldc, NAN);
    // Poisoned tables point far outside x, so an entry the builders skip makes an out-of-bounds read.
    std::vector<pe::TokenOrigin> tok(pl.bm, pe::TokenOrigin{int64_t{1} << 40, 0, 0});
    std::vector<pe::ColumnTap> col(pl.bk, pe::ColumnTap{int64_t{1} << 40, 0, 0});

    if (!pl.partial)
      for (int tid = 0; tid < nt; ++tid)
        pe::load_params(pl, g.Cout, bias.data(), gamma.data(), beta.data(), 1, 1, 1, params.data(), tid, nt);
    const bool resident = !pl.partial && pl.chunks == 1;
    if (resident) {
      for (int tid = 0; tid < nt; ++tid) pe::build_columns(g, pl, 0, col.data(), tid, nt);
      for (int tid = 0; tid < nt; ++tid) pe::gather_w<T>(g, pl, 0, 0, wr, ws.data(), tid, nt);
    }
    for (int64_t tile = block; tile < pl.tiles; tile += conv_grid) {
      const pe::TileCoord t = pe::tile_coord(pl, tile);
      for (int tid = 0; tid < nt; ++tid) pe::build_tokens(g, pl, t.m0, tok.data(), tid, nt);
      for (int chunk = t.chunk_begin; chunk < t.chunk_end; ++chunk) {
        if (!resident)
          for (int tid = 0; tid < nt; ++tid) pe::build_columns(g, pl, chunk, col.data(), tid, nt);
        for (int tid = 0; tid < nt; ++tid)
          pe::gather_a<T, V>(g, pl, tok.data(), col.data(), xr, a.data(), tid, nt);
        if (!resident)
          for (int tid = 0; tid < nt; ++tid) pe::gather_w<T>(g, pl, chunk, t.n0, wr, ws.data(), tid, nt);
        for (int tid = 0; tid < nt; ++tid)
          pe::simt_mma_chunk(pl, a.data(), ws.data(), c.data(), chunk == t.chunk_begin, tid, nt);
      }
      if (pl.partial)
        for (int tid = 0; tid < nt; ++tid) pe::store_partial(g, pl, c.data(), t, wsp, tid, nt);
      else
        emulate_epilogue(g, pl, c.data(), params.data(), t.m0, eps, writer);
    }
  }
  if (pl.partial) {
    for (int64_t i = 0; i < ws_size; ++i)
      EXPECT(ws_writes[i] == 1, "%s: workspace element %lld written %d times", pr.name, (long long)i, ws_writes[i]);
    const pe::Plan np = pe::make_norm_plan(g, pl);
    const int norm_grid = static_cast<int>(grid <= 0 || grid > np.tiles ? np.tiles : grid);
    for (int block = 0; block < norm_grid; ++block) {
      std::vector<float> params(3 * np.npad, NAN), c(np.bm * np.ldc, NAN);
      for (int tid = 0; tid < np.threads; ++tid)
        pe::load_params(np, g.Cout, bias.data(), gamma.data(), beta.data(), 1, 1, 1, params.data(), tid, np.threads);
      for (int64_t tile = block; tile < np.tiles; tile += norm_grid) {
        for (int tid = 0; tid < np.threads; ++tid)
          pe::sum_partials(g, np, wsp, tile * np.bm, c.data(), tid, np.threads);
        emulate_epilogue(g, np, c.data(), params.data(), tile * np.bm, eps, writer);
      }
    }
  }
  EXPECT(read_error.empty(), "%s: %s", pr.name, read_error.c_str());
  EXPECT(write_error.empty(), "%s: %s", pr.name, write_error.c_str());

  double max_err = 0;
  for (int64_t m = 0; m < g.M; ++m) {
    const int64_t wo = m % g.Wo, ho = (m / g.Wo) % g.Ho, b = m / (g.Wo * g.Ho);
    std::vector<double> v(pr.Cout);
    double mean = 0, var = 0;
    for (int64_t co = 0; co < pr.Cout; ++co) {
      v[co] = ref_value(pr, g, wst, x_ref, w_ref, b, ho, wo, co) + bias[co];
      mean += v[co];
    }
    mean /= pr.Cout;
    for (int64_t co = 0; co < pr.Cout; ++co) var += (v[co] - mean) * (v[co] - mean);
    var /= pr.Cout;
    for (int64_t co = 0; co < pr.Cout; ++co) {
      const int64_t off = m * pr.Cout + co;
      EXPECT(writes[off] == 1, "%s: output (b=%lld, ho=%lld, wo=%lld, c=%lld) written %d times", pr.name,
             (long long)b, (long long)ho, (long long)wo, (long long)co, writes[off]);
      const double ref = (v[co] - mean) / std::sqrt(var + eps) * gamma[co] + beta[co];
      const double err = std::fabs(out[off] - ref);
      EXPECT(err <= tol * (1 + std::fabs(ref)), "%s: output (b=%lld, ho=%lld, wo=%lld, c=%lld) = %.7g, reference %.7g",
             pr.name, (long long)b, (long long)ho, (long long)wo, (long long)co, out[off], ref);
      if (err > max_err) max_err = err;
      counted.out += writes[off];
    }
  }
  if (traffic != nullptr) *traffic = counted;
  std::printf("  ok  %-52s %-6s M=%-5lld K=%-5lld bm=%-3d bn=%-4d bk=%-3d chunks=%-3d splits=%d vec=%d max|err|=%.2e\n",
              pr.name, choice.kind == PlanChoice::kChosen ? "chosen" : choice.kind == PlanChoice::kFused ? "fused"
                       : choice.kind == PlanChoice::kFused16 ? "fused16" : "split",
              (long long)g.M, (long long)g.K, pl.bm, pl.bn, pl.bk, pl.chunks, pl.splits, V, max_err);
  return true;
}

// run_problem with x stored as fp32 (elem 4, tolerance 1e-4) or bf16 (elem 2: outputs are rounded to 8
// significant bits, half an ulp is 2^-9 relative: tolerance 2^-8), at the problem's expected vector width.
static bool run_stored(const Problem& pr, int elem, int grid, uint32_t seed, Traffic* traffic,
                       const PlanChoice& choice) {
  if (elem == 4)
    return pr.expect_vec == 4 ? run_problem<float, 4>(pr, grid, 1e-4, seed, traffic, choice)
                              : run_problem<float, 1>(pr, grid, 1e-4, seed, traffic, choice);
  if (pr.expect_vec == 8) return run_problem<HostBf16, 8>(pr, grid, 1.0 / 256, seed, traffic, choice);
  if (pr.expect_vec == 4) return run_problem<HostBf16, 4>(pr, grid, 1.0 / 256, seed, traffic, choice);
  return run_problem<HostBf16, 1>(pr, grid, 1.0 / 256, seed, traffic, choice);
}

static void print_plan(const pe::Geometry& g, const pe::Plan& pl, int elem) {
  const pe::Plan np = pl.partial ? pe::make_norm_plan(g, pl) : pl;
  std::printf("\"bm\": %d, \"bn\": %d, \"npad\": %d, \"bk\": %d, \"chunks\": %d, \"chunks_per_split\": %d, "
              "\"splits\": %d, \"col_blocks\": %d, \"row_tiles\": %lld, \"tiles\": %lld, \"partial\": %s, "
              "\"vec\": %d, \"smem\": %d, \"warps\": %d, \"norm_bm\": %d, \"norm_tiles\": %lld, "
              "\"norm_smem\": %d, \"seconds\": %.17g",
              pl.bm, pl.bn, pl.npad, pl.bk, pl.chunks, pl.chunks_per_split, pl.splits, pl.col_blocks,
              (long long)pl.row_tiles, (long long)pl.tiles, pl.partial ? "true" : "false", pl.vec, pl.smem_bytes,
              pl.warps, pl.partial ? np.bm : 0, pl.partial ? (long long)np.tiles : 0LL, pl.partial ? np.smem_bytes : 0,
              pe::plan_seconds(g, pl, elem, pe::x_gather_elements(g)));
}

// x contiguous in the layout's order, as the model assumes.
static pe::Geometry contiguous_geometry(const int64_t v[8], pe::Layout layout) {
  const int64_t sizes[4] = {v[0], v[1], v[2], v[3]};
  const int order_nchw[4] = {0, 1, 2, 3}, order_nhwc[4] = {0, 2, 3, 1};
  const Strided xs = make_strides(sizes, layout == pe::Layout::kNHWC ? order_nhwc : order_nchw, 0);
  return pe::make_geometry(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], layout, xs.strides);
}

// --plan B Cin H W Cout k s p layout elem [auto|fused|split]: make_plan's choice for an aligned, contiguous
// x, one JSON object.
static int plan_mode(int argc, char** argv) {
  int64_t v[8];
  for (int i = 0; i < 8; ++i) v[i] = std::atoll(argv[i]);
  const pe::Layout layout = std::string(argv[8]) == "nchw" ? pe::Layout::kNCHW : pe::Layout::kNHWC;
  const int elem = std::atoi(argv[9]);
  const pe::Geometry g = contiguous_geometry(v, layout);
  std::printf("{");
  const std::string kind = argc == 11 ? argv[10] : "auto";
  const pe::PlanKind k = kind == "fused"   ? pe::PlanKind::kFused
                         : kind == "split" ? pe::PlanKind::kSplit
                                           : pe::PlanKind::kBest;
  print_plan(g, pe::make_plan(g, elem, pe::choose_vec(g, elem, 0), k), elem);
  std::printf("}\n");
  return EXIT_SUCCESS;
}

// --traffic B Cin H W Cout k s p layout elem blocks [warps bm bn splits]: run one problem (random values,
// checked as above) on `blocks` emulated blocks per kernel, with make_plan's plan or the split plan named,
// and print the elements it reads and writes and its plan, one JSON object.
static int traffic_mode(int argc, char** argv) {
  int64_t v[8];
  for (int i = 0; i < 8; ++i) v[i] = std::atoll(argv[i]);
  const pe::Layout layout = std::string(argv[8]) == "nchw" ? pe::Layout::kNCHW : pe::Layout::kNHWC;
  const int elem = std::atoi(argv[9]), blocks = std::atoi(argv[10]);
  const pe::Geometry g = contiguous_geometry(v, layout);
  const int vec = pe::choose_vec(g, elem, 0);
  const Problem pr{"traffic", v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], layout, false, vec};
  PlanChoice choice;
  if (argc == 15) {
    choice.kind = PlanChoice::kSplit;
    choice.shape = pe::SplitShape{std::atoi(argv[11]), std::atoi(argv[12]), std::atoi(argv[13])};
    choice.splits = std::atoi(argv[14]);
  }
  Traffic t;
  const bool ok = run_stored(pr, elem, blocks, 7, &t, choice);
  const pe::Plan pl = choice.make(g, elem, vec);
  std::printf("{\"x\": %lld, \"weight\": %lld, \"out\": %lld, \"workspace_stored\": %lld, "
              "\"workspace_loaded\": %lld, ",
              (long long)t.x, (long long)t.weight, (long long)t.out, (long long)t.workspace_stored,
              (long long)t.workspace_loaded);
  print_plan(g, pl, elem);
  std::printf("}\n");
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}

int main(int argc, char** argv) {
  if ((argc == 13 || argc == 17) && std::string(argv[1]) == "--traffic") return traffic_mode(argc - 2, argv + 2);
  if ((argc == 12 || argc == 13) && std::string(argv[1]) == "--plan") return plan_mode(argc - 2, argv + 2);
  using L = pe::Layout;
  const L NCHW = L::kNCHW, NHWC = L::kNHWC;
  // name, B, Cin, H, W, Cout, k, s, p, layout, permuted strides, expected fp32 vector width
  const Problem fp32_cases[] = {
      {"v1 stage 1 k4s4p0 nchw 16x20", 2, 3, 16, 20, 64, 4, 4, 0, NCHW, false, 4},
      {"v1 stage 1 k4s4p0 nchw 13x9 (tails)", 2, 3, 13, 9, 64, 4, 4, 0, NCHW, false, 1},
      {"v1 stage 1 k4s4p0 nchw 52x44 (3 tiles)", 2, 3, 52, 44, 64, 4, 4, 0, NCHW, false, 4},
      {"v1 stage 1 k4s4p0 nchw 55x45 (3 tiles, tails)", 2, 3, 55, 45, 64, 4, 4, 0, NCHW, false, 1},
      {"v1 k4s4p0 nchw, channels-last strides + gaps", 1, 3, 12, 16, 64, 4, 4, 0, NCHW, true, 1},
      {"v1 stage 2 k2s2p0 nhwc Cin 64", 3, 64, 19, 19, 128, 2, 2, 0, NHWC, false, 4},
      {"v1 k2s2p0 nhwc Cin 5 Cout 37", 1, 5, 13, 9, 37, 2, 2, 0, NHWC, false, 1},
      {"v1 stage 3 k2s2p0 nhwc Cout 320 (streamed)", 1, 128, 7, 9, 320, 2, 2, 0, NHWC, false, 4},
      {"v1 k2s2p0 nhwc, nchw strides + gaps", 2, 8, 9, 7, 48, 2, 2, 0, NHWC, true, 1},
      {"v2 stage 1 k7s4p3 nchw 13x9", 2, 3, 13, 9, 64, 7, 4, 3, NCHW, false, 1},
      {"v2 stage 1 k7s4p3 nchw 61x47 (3 tiles)", 1, 3, 61, 47, 32, 7, 4, 3, NCHW, false, 1},
      {"v2 stage 2 k3s2p1 nhwc Cin 64 Cout 160", 1, 64, 13, 9, 160, 3, 2, 1, NHWC, false, 4},
      {"v2 k3s2p1 nhwc Cin 3 (odd K)", 2, 3, 11, 6, 16, 3, 2, 1, NHWC, false, 1},
      {"k3s1p2 nchw (whole windows in padding)", 1, 2, 5, 4, 24, 3, 1, 2, NCHW, false, 1},
      {"k4s4p4 nchw (vector loads in padding)", 2, 3, 12, 16, 24, 4, 4, 4, NCHW, false, 4},
      {"k2s2p0 nhwc Cout 1024 (streamed, 16 warps)", 1, 16, 6, 6, 1024, 2, 2, 0, NHWC, false, 4},
      {"k2s2p0 nchw batch 1 single token", 1, 4, 2, 3, 20, 2, 2, 0, NCHW, false, 1},
  };
  const Problem bf16_cases[] = {
      {"bf16 v1 stage 1 k4s4p0 nchw 8x12", 2, 3, 8, 12, 64, 4, 4, 0, NCHW, false, 4},
      {"bf16 v1 stage 2 k2s2p0 nhwc Cin 64", 2, 64, 19, 15, 128, 2, 2, 0, NHWC, false, 8},
      {"bf16 v2 stage 1 k7s4p3 nchw 13x9", 1, 3, 13, 9, 64, 7, 4, 3, NCHW, false, 1},
      {"bf16 v2 stage 1 k7s4p3 nchw 67x53 (3 tiles)", 1, 3, 67, 53, 64, 7, 4, 3, NCHW, false, 1},
      {"bf16 v2 stage 3 k3s2p1 nhwc Cin 128 Cout 320", 1, 128, 5, 7, 320, 3, 2, 1, NHWC, false, 8},
  };
  // Split plans, forced: (problem, block shape, splits wanted). Tails in M, in npad (Cout 72: npad 80 in
  // 64-column blocks), in the last split's chunks; K ranges of one chunk; generic strides.
  struct SplitCase {
    Problem pr;
    pe::SplitShape shape;
    int splits;
  };
  const SplitCase split_cases[] = {
      {{"4w 64x64 nhwc Cout 320, 3 splits of 8 chunks", 1, 128, 7, 9, 320, 2, 2, 0, NHWC, false, 4}, {4, 64, 64}, 3},
      {{"16w 64x256 v2 stage 4, 4 splits of 45 chunks", 1, 320, 9, 7, 512, 3, 2, 1, NHWC, false, 4}, {16, 64, 256}, 4},
      {{"8w 128x64 v2 stage 1 nchw, 2 splits", 2, 3, 67, 53, 64, 7, 4, 3, NCHW, false, 1}, {8, 128, 64}, 2},
      {{"4w 64x64 Cout 72, generic strides", 2, 20, 13, 9, 72, 3, 2, 1, NHWC, true, 1}, {4, 64, 64}, 2},
  };
  const SplitCase bf16_split_cases[] = {
      {{"bf16 16w 128x128 v2 stage 4, 6 splits", 1, 320, 9, 7, 512, 3, 2, 1, NHWC, false, 8}, {16, 128, 128}, 6},
      {{"bf16 8w 64x128 v1 stage 2, 2 splits", 2, 64, 19, 15, 128, 2, 2, 0, NHWC, false, 8}, {8, 64, 128}, 3},
      {{"bf16 8w 128x64 v1 stage 1 nchw, K in one chunk", 2, 3, 32, 40, 64, 4, 4, 0, NCHW, false, 4}, {8, 128, 64}, 2},
  };
  int total = 1;
  std::printf("plans\n");
  sweep_plans();
  // Each problem with the fused plan, with 16 warps where the default has 8 (bm doubled), and with
  // make_plan's choice where that is a split plan.
  auto runs = [&](const Problem& pr, int elem, int grid, uint32_t seed_base) {
    const int64_t unit[4] = {1, 1, 1, 1};
    const pe::Geometry g = pe::make_geometry(pr.B, pr.Cin, pr.H, pr.W, pr.Cout, pr.k, pr.s, pr.p, pr.layout, unit);
    PlanChoice choice;
    choice.kind = PlanChoice::kFused;
    ++total;
    run_stored(pr, elem, grid, seed_base + total, nullptr, choice);
    if (pe::default_fused_warps(round_up_16(pr.Cout)) < 16) {
      choice.kind = PlanChoice::kFused16;
      ++total;
      run_stored(pr, elem, grid, seed_base + total, nullptr, choice);
    }
    if (pe::make_plan(g, elem, pr.expect_vec).partial) {
      ++total;
      run_stored(pr, elem, grid, seed_base + total, nullptr, PlanChoice{});
    }
  };
  std::printf("fp32 storage (tolerance 1e-4)\n");
  for (const Problem& pr : fp32_cases) runs(pr, 4, 3, 1234);
  std::printf("bf16 storage (tolerance 2^-8)\n");
  for (const Problem& pr : bf16_cases) runs(pr, 2, 2, 99);
  std::printf("split plans, fp32 storage (tolerance 1e-4)\n");
  for (const SplitCase& sc : split_cases) {
    ++total;
    run_stored(sc.pr, 4, 3, 555 + total, nullptr, PlanChoice{PlanChoice::kSplit, sc.shape, sc.splits});
  }
  std::printf("split plans, bf16 storage (tolerance 2^-8)\n");
  for (const SplitCase& sc : bf16_split_cases) {
    ++total;
    run_stored(sc.pr, 2, 2, 777 + total, nullptr, PlanChoice{PlanChoice::kSplit, sc.shape, sc.splits});
  }
  std::printf("%d of %d problems passed\n", total - g_failures, total);
  return g_failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
