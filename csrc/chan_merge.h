// Chan et al.'s pairwise merge of per-channel (count, mean, M2) statistics, in double:
// the batch norm kernels merge cached chunks with it (bn_kernels.inc, once per ISA) and
// the handler merges the per-task partials in task order (bn_ffi.inc). A `static`
// template, so every translation unit keeps its own copy, compiled for its own
// instruction set (see the note in dwconv.h on sharing code between ISAs).
#ifndef JAXDSC_CSRC_CHAN_MERGE_H_
#define JAXDSC_CSRC_CHAN_MERGE_H_

#include <cstdint>

namespace jaxdsc_dw {

// (n_a, mean, m2) += (n_b, mean_b, m2_b) for channels [0, c).
template <class T>
static void chan_merge(double* mean, double* m2, int64_t c, double n_a, double n_b,
                       const T* mean_b, const T* m2_b) {
  const double n = n_a + n_b;
  for (int64_t j = 0; j < c; ++j) {
    const double delta = static_cast<double>(mean_b[j]) - mean[j];
    mean[j] += delta * (n_b / n);
    m2[j] += static_cast<double>(m2_b[j]) + delta * delta * (n_a * n_b / n);
  }
}

}  // namespace jaxdsc_dw

#endif  // JAXDSC_CSRC_CHAN_MERGE_H_
