// The CUDA implementations of pvt_fast::patch_embed and pvt_fast::_patch_embed_out (registered for the
// CUDA dispatch key in patch_embed_op.cpp); declared here for the timing driver, which calls them
// without the dispatcher (the schemas are defined in Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace pvt_fast {
namespace patch_embed {

at::Tensor patch_embed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t stride,
                            int64_t padding, double eps, c10::string_view layout);

void patch_embed_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t stride,
                          int64_t padding, double eps, c10::string_view layout, at::Tensor out);

}  // namespace patch_embed
}  // namespace pvt_fast
