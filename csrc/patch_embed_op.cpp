// CUDA implementation of pvt_fast::patch_embed and pvt_fast::_patch_embed_out (schemas defined in
// pvt_fast/ops/patch_embed.py): input checks at the boundary, then the kernel in patch_embed.cu on the
// current stream of x's device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "patch_embed_launch.h"
#include "patch_embed_op.h"

namespace pvt_fast {
namespace patch_embed {
namespace {

constexpr int64_t kMaxCoordinate = int64_t{1} << 28;  // see kAbsent in patch_embed_core.h

// "(2, 3, 13, 9)", as Python prints a shape.
std::string shape_of(at::IntArrayRef sizes) {
  std::string r = "(";
  for (size_t i = 0; i < sizes.size(); ++i) r += (i ? ", " : "") + std::to_string(sizes[i]);
  return r + (sizes.size() == 1 ? ",)" : ")");
}

Layout parse_layout(c10::string_view layout) {
  TORCH_CHECK_VALUE(layout == "nchw" || layout == "nhwc", "layout must be \"nchw\" or \"nhwc\", got \"",
                    std::string(layout), "\"");
  return layout == "nchw" ? Layout::kNCHW : Layout::kNHWC;
}

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::kFloat32;
}

void check_vector(const at::Tensor& t, const char* name, int64_t cout) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == cout, name, " must be (Cout,) == (", cout, ",), got ",
                    shape_of(t.sizes()));
}

// Validates every argument and returns the problem geometry.
Geometry check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t stride, int64_t padding,
                      Layout layout) {
  const char* x_shape = layout == Layout::kNCHW ? "(B, Cin, H, W)" : "(B, H, W, Cin)";
  const char* layout_name = layout == Layout::kNCHW ? "\"nchw\"" : "\"nhwc\"";
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&weight, "weight"}, {&bias, "bias"}, {&norm_weight, "norm_weight"}, {&norm_bias, "norm_bias"}};
  for (const auto& [t, name] : others)
    TORCH_CHECK_VALUE(t->device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t->device());
  dtype_of(x);  // rejects other dtypes
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be ", x_shape, " for layout ", layout_name, ", got ", shape_of(x.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.numel() > 0,
                    "weight must be (Cout, Cin, k, k) with a square kernel and no empty dimension, got ",
                    shape_of(weight.sizes()));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                   "weight must have x's dtype (", x.scalar_type(), ") or float32, got ", weight.scalar_type());
  const int64_t cout = weight.size(0), cin = weight.size(1), k = weight.size(2);
  // x's dimensions holding channels, rows and columns.
  const int c_dim = layout == Layout::kNCHW ? 1 : 3, h_dim = layout == Layout::kNCHW ? 2 : 1, w_dim = h_dim + 1;
  TORCH_CHECK_VALUE(x.size(c_dim) == cin, "x must be ", x_shape, " with Cin == weight.shape[1] == ", cin,
                    " for layout ", layout_name, ", got ", shape_of(x.sizes()));
  TORCH_CHECK_VALUE(cin * k * k < (int64_t{1} << 31), "weight's Cin * k * k must be < 2^31, got ", cin * k * k);
  TORCH_CHECK_VALUE(cout >= 1 && cout <= kMaxCout, "weight must have 1 to ", kMaxCout,
                    " output channels for the CUDA kernel, got ", cout);
  check_vector(bias, "bias", cout);
  check_vector(norm_weight, "norm_weight", cout);
  check_vector(norm_bias, "norm_bias", cout);
  TORCH_CHECK_TYPE(bias.scalar_type() == norm_weight.scalar_type() && bias.scalar_type() == norm_bias.scalar_type() &&
                   (bias.scalar_type() == x.scalar_type() || bias.scalar_type() == at::kFloat),
                   "bias, norm_weight and norm_bias must share one dtype, x's (", x.scalar_type(),
                   ") or float32, got ", bias.scalar_type(), ", ", norm_weight.scalar_type(), ", ",
                   norm_bias.scalar_type());
  TORCH_CHECK_VALUE(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0 && padding < kMaxCoordinate, "padding must be in [0, 2^28), got ", padding);
  const int64_t h = x.size(h_dim), w = x.size(w_dim);
  TORCH_CHECK_VALUE(h < kMaxCoordinate && w < kMaxCoordinate && k < kMaxCoordinate,
                    "x's height and width and the kernel size must be < 2^28, got (", h, ", ", w, ") and ", k);
  TORCH_CHECK_VALUE(h + 2 * padding >= k && w + 2 * padding >= k, "x's padded size (", h + 2 * padding, ", ",
                    w + 2 * padding, ") must be at least the kernel size ", k);

  const int64_t x_strides[4] = {x.stride(0), x.stride(c_dim), x.stride(h_dim), x.stride(w_dim)};
  return make_geometry(x.size(0), cin, h, w, cout, k, stride, padding, layout, x_strides);
}

// PVT_FAST_PATCH_EMBED_PLAN (for tests on a GPU: every kernel and tiling on the same problem): unset, ""
// or "auto" lets make_plan choose; "fused" or "split" restricts it; "split:W:BM:BN:S" takes the split plan
// of that kSplitShapes entry (W warps, BM x BN tiles) with about S splits.
void apply_plan_env(const Geometry& g, LaunchArgs& a) {
  const char* value = std::getenv("PVT_FAST_PATCH_EMBED_PLAN");
  const std::string v = value == nullptr ? "" : value;
  const char* expected = "PVT_FAST_PATCH_EMBED_PLAN must be \"auto\", \"fused\", \"split\" or \"split:W:BM:BN:S\"";
  if (v.empty() || v == "auto") return;
  if (v == "fused" || v == "split") {
    a.plan_kind = v == "fused" ? PlanKind::kFused : PlanKind::kSplit;
    return;
  }
  int w = 0, bm = 0, bn = 0, splits = 0;
  char tail = 0;
  TORCH_CHECK_VALUE(std::sscanf(v.c_str(), "split:%d:%d:%d:%d%c", &w, &bm, &bn, &splits, &tail) == 4, expected,
                    ", got \"", v, "\"");
  bool known = false;
  std::string shapes;
  for (const SplitShape& shape : kSplitShapes) {
    known |= shape.warps == w && shape.bm == bm && shape.bn == bn;
    shapes += (shapes.empty() ? "" : ", ") + std::to_string(shape.warps) + ":" + std::to_string(shape.bm) + ":" +
              std::to_string(shape.bn);
  }
  const int npad = round_up(static_cast<int>(g.Cout), 16);
  TORCH_CHECK_VALUE(known && splits >= 1 && bn <= npad, "PVT_FAST_PATCH_EMBED_PLAN \"", v,
                    "\" names no split plan for Cout ", g.Cout, ": W:BM:BN must be one of ", shapes, " with BN <= ",
                    npad, ", and S >= 1");
  a.split_shape = SplitShape{w, bm, bn};
  a.split_count = splits;
}

// The device's opt-in shared memory per block, capped at what plans are built for; queried once per device.
int max_smem_of(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, int> by_device;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = by_device.find(device.index());
  if (it == by_device.end()) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
    it = by_device.emplace(device.index(), optin < kMaxSmemBytes ? optin : kMaxSmemBytes).first;
  }
  return it->second;
}

// The weight as the kernel reads it (see patch_embed_core.h): (Cout, packed_pitch) contiguous in x's dtype,
// columns in the layout's kk order ((ci, kh, kw) is OIHW's; (kh, kw, ci) is OHWI's), zero past K. One
// copy per call, from any layout and from fp32 (rounded to nearest even, as autocast's cast).
at::Tensor pack_weight(const Geometry& g, const at::Tensor& weight, const at::Tensor& x) {
  const at::Tensor ordered = g.layout == Layout::kNCHW ? weight : weight.permute({0, 2, 3, 1});
  at::Tensor packed = at::empty({g.Cout, packed_pitch(g)}, x.options());
  packed.narrow(1, 0, g.K).view({g.Cout, ordered.size(1), ordered.size(2), ordered.size(3)}).copy_(ordered);
  if (packed_pitch(g) > g.K) packed.narrow(1, g.K, packed_pitch(g) - g.K).zero_();
  return packed;
}

void run(const Geometry& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
         const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps, at::Tensor& out) {
  if (g.M == 0) return;
  LaunchArgs a{};
  a.g = g;
  a.dtype = dtype_of(x);
  a.x = x.data_ptr();
  const at::Tensor packed = pack_weight(g, weight, x);
  a.weight = packed.data_ptr();
  a.bias = bias.data_ptr();
  a.norm_weight = norm_weight.data_ptr();
  a.norm_bias = norm_bias.data_ptr();
  a.params_fp32 = bias.scalar_type() == at::kFloat;
  a.bias_stride = bias.stride(0);
  a.norm_weight_stride = norm_weight.stride(0);
  a.norm_bias_stride = norm_bias.stride(0);
  a.eps = static_cast<float>(eps);
  a.out = out.data_ptr();
  a.max_smem = max_smem_of(x.device());
  apply_plan_env(g, a);
  const Plan plan = plan_for(a);
  TORCH_CHECK(plan.smem_bytes <= a.max_smem, "patch_embed: the plan needs ", plan.smem_bytes,
              " bytes of shared memory per block, over this GPU's ", a.max_smem);
  at::Tensor workspace;
  if (plan.partial) {
    workspace = at::empty({plan.splits, g.M, plan.npad}, x.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_patch_embed(a, plan, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
}

}  // namespace

at::Tensor patch_embed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t stride,
                            int64_t padding, double eps, c10::string_view layout) {
  const Geometry g =
      check_inputs(x, weight, bias, norm_weight, norm_bias, stride, padding, parse_layout(layout));
  at::Tensor out = at::empty({g.B, g.Ho * g.Wo, g.Cout}, x.options());
  run(g, x, weight, bias, norm_weight, norm_bias, eps, out);
  return out;
}

void patch_embed_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t stride,
                          int64_t padding, double eps, c10::string_view layout, at::Tensor out) {
  const Geometry g =
      check_inputs(x, weight, bias, norm_weight, norm_bias, stride, padding, parse_layout(layout));
  TORCH_CHECK_VALUE(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                    out.sizes() == at::IntArrayRef({g.B, g.Ho * g.Wo, g.Cout}),
                    "out must be a contiguous (B, Ho*Wo, Cout) == (", g.B, ", ", g.Ho * g.Wo, ", ", g.Cout,
                    ") tensor of x's dtype and device, got ", shape_of(out.sizes()), " ", out.scalar_type(),
                    " on ", out.device(), out.is_contiguous() ? "" : " (not contiguous)");
  run(g, x, weight, bias, norm_weight, norm_bias, eps, out);
}

TORCH_LIBRARY_IMPL(pvt_fast, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("_patch_embed_out", &patch_embed_out_cuda);
}

}  // namespace patch_embed
}  // namespace pvt_fast
