// Times the fused patch-embedding kernel alone against PyTorch's conv -> flatten/transpose -> LayerNorm
// on PVT's patch-embedding shapes (built by CMakeLists.txt where libtorch is found).
//
//   patch_embed_bench            median of 50 timed calls per case, inputs rotated past the L2 cache
//   patch_embed_bench --once     one call of each implementation per case (for ncu / nsys)
//
// Prints, for make_plan's plan, the fused plan and the best split plan of each case (forced through
// PVT_FAST_PATCH_EMBED_PLAN), the time, the bandwidth against the minimum byte count (x once, tokens
// once, parameters) and the largest difference from the PyTorch result.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "patch_embed_launch.h"
#include "patch_embed_op.h"

namespace {

struct Case {
  const char* name;
  int64_t B, Cin, H, W, Cout, k, s, p;
  const char* layout;
  at::ScalarType dtype;
};

double median_us(const std::function<void(int)>& fn, int iters) {
  for (int i = 0; i < 3; ++i) fn(i);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<double> times;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(start, stream);
    fn(i);
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms * 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void run_case(const Case& c, bool once) {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(c.dtype);
  const bool nhwc = std::strcmp(c.layout, "nhwc") == 0;
  const std::vector<int64_t> x_shape =
      nhwc ? std::vector<int64_t>{c.B, c.H, c.W, c.Cin} : std::vector<int64_t>{c.B, c.Cin, c.H, c.W};
  const int64_t x_bytes = c.B * c.Cin * c.H * c.W * at::elementSize(c.dtype);
  const int copies = static_cast<int>(std::max<int64_t>(1, (200ll << 20) / std::max<int64_t>(x_bytes, 1)));
  std::vector<at::Tensor> xs;
  for (int i = 0; i < std::min(copies, 8); ++i) xs.push_back(at::randn(x_shape, opts));
  const at::Tensor w = at::randn({c.Cout, c.Cin, c.k, c.k}, opts) * 0.1;
  const at::Tensor b = at::randn({c.Cout}, opts), nw = at::randn({c.Cout}, opts), nb = at::randn({c.Cout}, opts);
  const double eps = 1e-6;

  auto fused = [&](int i) {
    return pvt_fast::patch_embed::patch_embed_cuda(xs[i % xs.size()], w, b, nw, nb, c.s, c.p, eps, c.layout);
  };
  auto torch_ref = [&](int i) {
    const at::Tensor& x = xs[i % xs.size()];
    const at::Tensor image = nhwc ? x.permute({0, 3, 1, 2}) : x;
    const at::Tensor y = at::conv2d(image, w, b, {c.s, c.s}, {c.p, c.p});
    return at::layer_norm(y.flatten(2).transpose(1, 2), {c.Cout}, nw, nb, eps);
  };
  if (once) {
    fused(0);
    torch_ref(0);
    cudaDeviceSynchronize();
    std::printf("%-34s ran once\n", c.name);
    return;
  }
  const double t_torch = median_us([&](int i) { torch_ref(i); }, 50);
  namespace pe = pvt_fast::patch_embed;
  const int64_t strides[4] = {nhwc ? c.H * c.W * c.Cin : c.Cin * c.H * c.W, nhwc ? 1 : c.H * c.W,
                              nhwc ? c.W * c.Cin : c.W, nhwc ? c.Cin : 1};
  const pe::Geometry g = pe::make_geometry(c.B, c.Cin, c.H, c.W, c.Cout, c.k, c.s, c.p,
                                           nhwc ? pe::Layout::kNHWC : pe::Layout::kNCHW, strides);
  const int es = static_cast<int>(at::elementSize(c.dtype));
  // The plan make_plan picks, then the fused plan and the best split plan (PVT_FAST_PATCH_EMBED_PLAN).
  for (const char* kind : {"auto", "fused", "split"}) {
    setenv("PVT_FAST_PATCH_EMBED_PLAN", kind, 1);
    const pe::PlanKind k = kind[0] == 'a' ? pe::PlanKind::kBest : kind[0] == 'f' ? pe::PlanKind::kFused
                                                                                : pe::PlanKind::kSplit;
    const pe::Plan pl = pe::make_plan(g, es, pe::choose_vec(g, es, 0), k);
    if (k == pe::PlanKind::kSplit && !pl.partial) continue;  // Cout too narrow for a split plan
    char plan[64];
    std::snprintf(plan, sizeof(plan), "%s %dx%d/%d", pl.partial ? "split" : "fused", pl.bm, pl.bn, pl.splits);
    const at::Tensor out = fused(0);
    const double max_diff = (out.to(at::kFloat) - torch_ref(0).to(at::kFloat)).abs().max().item<double>();
    const double t_fused = median_us([&](int i) { fused(i); }, 50);
    const double bytes =
        static_cast<double>(x_bytes + out.numel() * out.element_size() + w.numel() * w.element_size());
    std::printf("%-34s %-5s %-18s %8.1f us %7.0f GB/s | torch %8.1f us | %5.2fx | min bytes %6.1f MB | "
                "max|diff| %.2e\n", c.name, kind, plan, t_fused, bytes / t_fused * 1e-3, t_torch, t_torch / t_fused,
                bytes * 1e-6, max_diff);
  }
  unsetenv("PVT_FAST_PATCH_EMBED_PLAN");
}

}  // namespace

int main(int argc, char** argv) {
  const bool once = argc > 1 && std::strcmp(argv[1], "--once") == 0;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "patch_embed_bench: no CUDA device\n");
    return 1;
  }
  const auto bf16 = at::kBFloat16, fp16 = at::kHalf, fp32 = at::kFloat;
  const Case cases[] = {
      {"v1 stage 1 k4s4 224 b64 bf16", 64, 3, 224, 224, 64, 4, 4, 0, "nchw", bf16},
      {"v1 stage 1 k4s4 224 b64 fp16", 64, 3, 224, 224, 64, 4, 4, 0, "nchw", fp16},
      {"v1 stage 1 k4s4 224 b64 fp32", 64, 3, 224, 224, 64, 4, 4, 0, "nchw", fp32},
      {"v1 stage 2 k2s2 56 b64 bf16", 64, 64, 56, 56, 128, 2, 2, 0, "nhwc", bf16},
      {"v1 stage 3 k2s2 28 b64 bf16", 64, 128, 28, 28, 320, 2, 2, 0, "nhwc", bf16},
      {"v1 stage 4 k2s2 14 b64 bf16", 64, 320, 14, 14, 512, 2, 2, 0, "nhwc", bf16},
      {"v2 stage 1 k7s4p3 224 b64 bf16", 64, 3, 224, 224, 64, 7, 4, 3, "nchw", bf16},
      {"v2 stage 2 k3s2p1 56 b64 bf16", 64, 64, 56, 56, 128, 3, 2, 1, "nhwc", bf16},
      {"v2 stage 3 k3s2p1 28 b64 bf16", 64, 128, 28, 28, 320, 3, 2, 1, "nhwc", bf16},
      {"v2 stage 4 k3s2p1 14 b64 bf16", 64, 320, 14, 14, 512, 3, 2, 1, "nhwc", bf16},
      {"v1 stage 1 k4s4 1024 b8 bf16", 8, 3, 1024, 1024, 64, 4, 4, 0, "nchw", bf16},
      {"v2 stage 2 k3s2p1 1024 b1 bf16", 1, 64, 256, 256, 128, 3, 2, 1, "nhwc", bf16},
      {"v2 stage 3 k3s2p1 1024 b1 bf16", 1, 128, 128, 128, 320, 3, 2, 1, "nhwc", bf16},
      {"v2 stage 4 k3s2p1 1024 b1 bf16", 1, 320, 64, 64, 512, 3, 2, 1, "nhwc", bf16},
      {"v2 stage 4 k3s2p1 1024 b1 fp32", 1, 320, 64, 64, 512, 3, 2, 1, "nhwc", fp32},
  };
  for (const Case& c : cases) run_case(c, once);
  return 0;
}
