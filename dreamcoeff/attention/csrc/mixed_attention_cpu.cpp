// Fused Coeff-Tuning attention for the CPU: O^h = sum_i A[h, i] softmax(scale Q^i K^i^T + mask) V^h.
//
// Built on first use by dreamcoeff/cpu_kernel.py (torch.utils.cpp_extension) and registered as the
// operators torch.ops.dreamcoeff_cpu.forward / backward. The chunked PyTorch path computes the same
// op by op over big blocks, each op streaming the whole block through memory; here each thread takes
// a block of query rows for all heads and runs every step while the data are in its caches:
//   forward, per block of R rows: S^h = scale Q^h K^h^T (+ mask) and exp(S^h - max) row by row
//     right after the GEMM (the row is in L1), then per tile of key columns the mixed maps of all
//     heads in one pass over the H maps, with each row's 1/sum folded into the coefficients, and
//     O^h += (A P)^h_tile V^h_tile.
//   backward, per block, from the saved row log-sum-exp (no max or sum pass): P^h = exp(S^h - lse),
//     dM^h = dO^h V^h^T, per row G_r = dM_r P_r^T (gives dA and the softmax backward's row sums),
//     then per tile dV^h += (A P)^h^T dO^h, dS^i = P^i (sum_h A[h, i] dM^h - delta^i) in the mix's
//     epilogue, dQ^i += scale dS^i K^i and dK^i += scale dS^i^T Q^i.
// GEMMs go to the BLAS inside libtorch (sgemm_/dgemm_; inside a parallel region they run on the
// calling thread). Tensors arrive contiguous, float32 or float64 (cpu_kernel.py prepares them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

using at::vec::Vectorized;
// Output heads mixed per pass over the maps: each pass reads all H maps of the block, which live in
// L3 (H x rows x L floats outgrow L2), so one pass for up to 16 heads (SDXL has 10 and 20); 16
// accumulators and the loaded map fit AVX-512's 32 registers.
constexpr int kMaxGroup = 16;

// Row-major C (m x n) = alpha op(A) op(B) + beta C. BLAS is column-major, where a row-major matrix
// reads as its transpose: C^T = op(B)^T op(A)^T, so swap the operands.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
}

// A 64-byte vector in GCC's vector extension: one AVX-512 register (two AVX2 ones, four SSE ones).
// The mix uses it instead of at::vec::Vectorized because GCC keeps an array of these accumulators in
// registers, while with Vectorized it spilled all 16 to the stack after every FMA (perf annotate:
// the mix ran at about a fifth of the FMA rate).
// (The attribute must name a concrete type: on a template parameter GCC ignores it.)
typedef float Float64B __attribute__((vector_size(64)));
typedef double Double64B __attribute__((vector_size(64)));
template <typename T>
using Vec64 = std::conditional_t<std::is_same_v<T, float>, Float64B, Double64B>;

template <typename T>
inline Vec64<T> load64(const T* p) {
  Vec64<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store64(T* p, const Vec64<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// out[g] (rows x cols, leading dim ld_out, head stride out_hs) = sum_i coef[g * H + i] src[i]
// for G output heads: every src vector is loaded once and feeds G accumulators. With row_scale
// (H x rows, row stride rs_hs per head) source i's row r is scaled by row_scale[i * rs_hs + r] first:
// the forward passes each row's 1 / sum(exp) here instead of normalising the maps in a separate pass.
//
// With grad_of (the maps P: head stride grad_hs, leading dimension grad_ld) and delta (H x rows,
// head stride delta_hs) the result becomes the softmax backward on the way out:
// out[g] = P[g] (sum - delta[g, r]).
//
// The last vector of a row runs full width: it reads and writes up to W - 1 columns past `cols`.
// Every buffer handed to mix() is one of the kernel's own, whose rows end in a zeroed 64-byte pad, and
// nothing reads those columns back (a scalar tail cost 17% of the mix at L = 77).
template <typename T, int G>
void mix_group(T* out, int64_t out_hs, int64_t ld_out, const T* coef, int64_t heads, const T* src, int64_t src_hs,
               int64_t ld_src, int64_t rows, int64_t cols, const T* row_scale, int64_t rs_hs, const T* grad_of,
               int64_t grad_hs, int64_t grad_ld, const T* delta, int64_t delta_hs) {
  using V = Vec64<T>;
  constexpr int64_t W = sizeof(V) / sizeof(T);
  std::vector<T> scaled(G * heads);
  for (int64_t r = 0; r < rows; ++r) {
    for (int g = 0; g < G; ++g) {
      for (int64_t i = 0; i < heads; ++i) {
        scaled[g * heads + i] = coef[g * heads + i] * (row_scale ? row_scale[i * rs_hs + r] : T(1));
      }
    }
    const T* c = scaled.data();
    const T* src_r = src + r * ld_src;
    for (int64_t j = 0; j < cols; j += W) {
      V acc[G];
      for (int g = 0; g < G; ++g) acc[g] = V{};
      for (int64_t i = 0; i < heads; ++i) {
        const V p = load64(src_r + i * src_hs + j);
        for (int g = 0; g < G; ++g) acc[g] += c[g * heads + i] * p;  // an FMA (-ffp-contract=fast)
      }
      if (grad_of) {
        for (int g = 0; g < G; ++g) {
          acc[g] = load64(grad_of + g * grad_hs + r * grad_ld + j) * (acc[g] - delta[g * delta_hs + r]);
        }
      }
      for (int g = 0; g < G; ++g) store64(out + g * out_hs + r * ld_out + j, acc[g]);
    }
  }
}

// n_out output heads, in groups of up to kMaxGroup: out[o] = sum_i coef[o, i] src[i] (coef n_out x H).
template <typename T>
void mix(T* out, int64_t out_hs, int64_t ld_out, const T* coef, int64_t n_out, int64_t heads, const T* src,
         int64_t src_hs, int64_t ld_src, int64_t rows, int64_t cols, const T* row_scale = nullptr,
         int64_t rs_hs = 0, const T* grad_of = nullptr, int64_t grad_hs = 0, int64_t grad_ld = 0,
         const T* delta = nullptr, int64_t delta_hs = 0) {
  for (int64_t h0 = 0; h0 < n_out; h0 += kMaxGroup) {
    const int64_t g = std::min<int64_t>(kMaxGroup, n_out - h0);
    T* o = out + h0 * out_hs;
    const T* c = coef + h0 * heads;
    const T* go = grad_of ? grad_of + h0 * grad_hs : nullptr;
    const T* dl = delta ? delta + h0 * delta_hs : nullptr;
    switch (g) {
#define DREAMCOEFF_MIX_CASE(G) \
  case G:                                                                                                  \
    mix_group<T, G>(o, out_hs, ld_out, c, heads, src, src_hs, ld_src, rows, cols, row_scale, rs_hs, go, grad_hs, grad_ld, dl, delta_hs); \
    break;
      DREAMCOEFF_MIX_CASE(1) DREAMCOEFF_MIX_CASE(2) DREAMCOEFF_MIX_CASE(3) DREAMCOEFF_MIX_CASE(4)
      DREAMCOEFF_MIX_CASE(5) DREAMCOEFF_MIX_CASE(6) DREAMCOEFF_MIX_CASE(7) DREAMCOEFF_MIX_CASE(8)
      DREAMCOEFF_MIX_CASE(9) DREAMCOEFF_MIX_CASE(10) DREAMCOEFF_MIX_CASE(11) DREAMCOEFF_MIX_CASE(12)
      DREAMCOEFF_MIX_CASE(13) DREAMCOEFF_MIX_CASE(14) DREAMCOEFF_MIX_CASE(15) DREAMCOEFF_MIX_CASE(16)
#undef DREAMCOEFF_MIX_CASE
    }
  }
}

// Adds one row of the (expanded, possibly broadcast) additive mask to a row of scores.
template <typename T>
void add_mask_row(T* row, const T* mask_row, int64_t mask_stride, int64_t n) {
  if (mask_stride == 1) {
    at::vec::map2<T>([](Vectorized<T> x, Vectorized<T> m) { return x + m; }, row, row, mask_row, n);
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] += mask_row[j * mask_stride];
  }
}

// x <- exp(x - max(x)) in place (the softmax before normalising); returns the row's log-sum-exp
// (max + log sum, saved for the backward) and sets *inv_sum = 1 / sum.
template <typename T>
T exp_row_(T* x, int64_t n, T* inv_sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T mx = at::vec::reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  const Vec vmx(mx);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = (Vec::loadu(x + j) - vmx).exp_u20();
    e.store(x + j);
    vsum = vsum + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  *inv_sum = T(1) / sum;
  return mx + std::log(sum);
}

// p <- exp(p - lse): the normalised probabilities again, from the forward's log-sum-exp.
template <typename T>
void exp_shifted_row_(T* x, T lse, int64_t n) {
  const Vectorized<T> shift(lse);
  at::vec::map<T>([shift](Vectorized<T> v) { return (v - shift).exp_u20(); }, x, x, n);
}

struct Shape {
  int64_t B, H, N, L, d, dv;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coeff,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, rows, dim)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  for (const at::Tensor* t : {&q, &k, &v, &coeff}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                "inputs must be contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(coeff.dim() == 2 && coeff.size(0) == q.size(1) && coeff.size(1) == q.size(1), "coeff must be (H, H)");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && mask->scalar_type() == q.scalar_type(), "mask must be 4-D, dtype of q");
    TORCH_CHECK(mask->size(0) == q.size(0) && mask->size(1) == q.size(1) && mask->size(2) == q.size(2) &&
                    mask->size(3) == k.size(2),
                "mask must be expanded to (B, H, N, L)");
  }
}

// Rows per block, keys per tile, and the strides of the per-thread buffers: rows (ld) and heads (hs)
// of the full-row maps, rows (ldm) and heads (hsm) of the tiles, each padded by a cache line. With L a
// power of two every row and every head would otherwise start in the same cache set, and the mix,
// which streams all heads at once, would evict its own lines (the same for the GEMMs' power-of-two
// ldc). The pad also takes the mix's full-width last vector of a row (see mix_group).
struct Blocking {
  int64_t RB, TC, blocks, ld, hs, ldm, hsm;
};

template <typename T>
Blocking blocking(const Shape& s, int64_t block_rows, int64_t tile_cols) {
  const int64_t RB = std::min(block_rows, s.N), TC = std::min(tile_cols, s.L), pad = 64 / sizeof(T);
  const int64_t ld = s.L + pad, ldm = TC + pad;
  return {RB, TC, (s.N + RB - 1) / RB, ld, RB * ld + pad, ldm, RB * ldm + pad};
}

// S^h = scale Q^h K^h^T (+ mask) for R query rows from r0 of head h of batch element b, into `out`
// (leading dimension ld): where both passes start. K^T comes as (d x L) row-major, so the GEMM streams
// its wide operand with unit stride (MKL sgemm, 64 x 64 x 4096: 151 GFLOP/s against 92 with K
// transposed on the fly).
template <typename T>
struct Scores {
  Shape s;
  T scale;
  const T *q, *k_t, *mask;
  std::vector<int64_t> mask_strides;

  Scores(const Shape& shape, T scale_, const at::Tensor& q_, const at::Tensor& k_t_,
         const std::optional<at::Tensor>& mask_)
      : s(shape), scale(scale_), q(q_.data_ptr<T>()), k_t(k_t_.data_ptr<T>()),
        mask(mask_.has_value() ? mask_->data_ptr<T>() : nullptr),
        mask_strides(mask_.has_value() ? mask_->strides().vec() : std::vector<int64_t>(4, 0)) {}

  void operator()(T* out, int64_t ld, int64_t b, int64_t h, int64_t r0, int64_t R) const {
    const int64_t bh = b * s.H + h;
    gemm<T>(false, false, R, s.L, s.d, scale, q + (bh * s.N + r0) * s.d, s.d, k_t + bh * s.L * s.d, s.L, T(0), out,
            ld);
    if (!mask) return;
    const int64_t* ms = mask_strides.data();
    for (int64_t r = 0; r < R; ++r) {
      add_mask_row(out + r * ld, mask + b * ms[0] + h * ms[1] + (r0 + r) * ms[2], ms[3], s.L);
    }
  }
};

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coeff,
                  const std::optional<at::Tensor>& mask, T scale, int64_t block_rows, int64_t tile_cols,
                  at::Tensor& out, at::Tensor& lse) {
  const Shape s = shape_of(q, k, v);
  const auto [RB, TC, blocks, ld, hs, ldm, hsm] = blocking<T>(s, block_rows, tile_cols);
  const at::Tensor k_t = k.transpose(-1, -2).contiguous();
  const Scores<T> scores(s, scale, q, k_t, mask);
  const T *vp = v.data_ptr<T>(), *ap = coeff.data_ptr<T>();
  T *op = out.data_ptr<T>(), *lp = lse.data_ptr<T>();

  at::parallel_for(0, s.B * blocks, 1, [&](int64_t begin, int64_t end) {
    // Zeroed once per call and thread: the row pads must hold finite numbers for the mix's last vector.
    std::unique_ptr<T[]> probs(new T[s.H * hs]()), mixed(new T[s.H * hsm]()), inv(new T[s.H * RB]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, r0 = (task % blocks) * RB, R = std::min(RB, s.N - r0);
      for (int64_t h = 0; h < s.H; ++h) {
        const int64_t bh = b * s.H + h;
        T* ph = probs.get() + h * hs;
        scores(ph, ld, b, h, r0, R);
        for (int64_t r = 0; r < R; ++r) {  // right after the head's GEMM, while its block is in L2
          lp[bh * s.N + r0 + r] = exp_row_(ph + r * ld, s.L, inv.get() + h * RB + r);
        }
      }
      for (int64_t t0 = 0; t0 < s.L; t0 += TC) {  // (A P)^h of this column tile, O^h += (A P)^h V^h
        const int64_t tc = std::min(TC, s.L - t0);
        mix<T>(mixed.get(), hsm, ldm, ap, s.H, s.H, probs.get() + t0, hs, ld, R, tc, inv.get(), RB);
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t bh = b * s.H + h;
          gemm<T>(false, false, R, s.dv, tc, T(1), mixed.get() + h * hsm, ldm, vp + (bh * s.L + t0) * s.dv, s.dv,
                  t0 == 0 ? T(0) : T(1), op + (bh * s.N + r0) * s.dv, s.dv);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coeff,
                   const std::optional<at::Tensor>& mask, const at::Tensor& lse, const at::Tensor& grad_out,
                   T scale, bool need_q, bool need_k, bool need_v, bool need_a, int64_t block_rows,
                   int64_t tile_cols, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& da) {
  const Shape s = shape_of(q, k, v);
  const auto [RB, TC, blocks, ld, hs, ldm, hsm] = blocking<T>(s, block_rows, tile_cols);
  const bool need_qk = need_q || need_k, need_dm = need_qk || need_a;
  // K^T and V^T as (dim x L) row-major for the two wide GEMMs with inner dimension d (see Scores).
  const at::Tensor k_t = k.transpose(-1, -2).contiguous(), v_t = v.transpose(-1, -2).contiguous();
  const Scores<T> scores(s, scale, q, k_t, mask);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vtp = v_t.data_ptr<T>();
  const T *ap = coeff.data_ptr<T>(), *lp = lse.data_ptr<T>(), *gp = grad_out.data_ptr<T>();
  const at::Tensor a_t = coeff.t().contiguous();  // dP^i = sum_h A[h, i] dM^h mixes with A^T
  const T* atp = a_t.data_ptr<T>();
  T* dqp = need_q ? dq.data_ptr<T>() : nullptr;

  // dK, dV and dA sum over all query rows, which the threads share out: each worker (a fixed range
  // of row blocks) accumulates into its own buffers, worker 0 straight into the outputs, and the
  // others are added in worker order afterwards (deterministic, no locks).
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t per_worker = (blocks + workers - 1) / workers;
  const int64_t kv_numel = s.H * s.L;  // per batch element, times d or dv
  std::vector<std::vector<T>> dk_acc(workers), dv_acc(workers), da_acc(workers);

  for (int64_t b = 0; b < s.B; ++b) {
    T* dk_b = need_k ? dk.data_ptr<T>() + b * kv_numel * s.d : nullptr;
    T* dv_b = need_v ? dv.data_ptr<T>() + b * kv_numel * s.dv : nullptr;
    at::parallel_for(0, workers, 1, [&](int64_t wbegin, int64_t wend) {
      // Full rows of P and dM for the block; tiles (L2) for the mixed maps and dS. Zeroed (row pads).
      std::unique_ptr<T[]> probs(new T[s.H * hs]()), grad_mixed(new T[need_dm ? s.H * hs : 0]()),
          tile(new T[need_v || need_qk ? s.H * hsm : 0]()), pair(new T[RB * s.H * s.H]), delta(new T[s.H * RB]);
      for (int64_t w = wbegin; w < wend; ++w) {
        T *dk_w = dk_b, *dv_w = dv_b, *da_w = need_a ? da.data_ptr<T>() : nullptr;
        if (w > 0) {  // zero-initialised private accumulators
          if (need_k) dk_acc[w].assign(kv_numel * s.d, T(0)), dk_w = dk_acc[w].data();
          if (need_v) dv_acc[w].assign(kv_numel * s.dv, T(0)), dv_w = dv_acc[w].data();
          if (need_a) da_acc[w].assign(s.H * s.H, T(0)), da_w = da_acc[w].data();
        }
        for (int64_t blk = w * per_worker; blk < std::min(blocks, (w + 1) * per_worker); ++blk) {
          const int64_t r0 = blk * RB, R = std::min(RB, s.N - r0);
          // The maps again, from the scores and the saved log-sum-exp (already normalised), and
          // dM^h = dO^h V^h^T, the gradient of the mixed map (A P)^h.
          for (int64_t h = 0; h < s.H; ++h) {
            const int64_t bh = b * s.H + h;
            T* ph = probs.get() + h * hs;
            scores(ph, ld, b, h, r0, R);
            for (int64_t r = 0; r < R; ++r) exp_shifted_row_(ph + r * ld, lp[bh * s.N + r0 + r], s.L);
            if (need_dm) {
              gemm<T>(false, false, R, s.L, s.dv, T(1), gp + (bh * s.N + r0) * s.dv, s.dv, vtp + bh * s.L * s.dv,
                      s.L, T(0), grad_mixed.get() + h * hs, ld);
            }
          }
          if (need_dm) {
            // Per row r the H x H products G_r = dM_r P_r^T (an (H x L) @ (L x H) GEMM; MKL does these
            // 2-4x faster than a vector loop over the pairs). They give both dA = sum_r G_r and the
            // softmax backward's row sums without another pass over the maps:
            //   delta^i_r = <P^i_r, dP^i_r> = sum_h A[h, i] <P^i_r, dM^h_r> = sum_h A[h, i] G_r[h, i].
            for (int64_t r = 0; r < R; ++r) {
              T* g_r = pair.get() + r * s.H * s.H;
              gemm<T>(false, true, s.H, s.H, s.L, T(1), grad_mixed.get() + r * ld, hs, probs.get() + r * ld, hs,
                      T(0), g_r, s.H);
              for (int64_t i = 0; i < s.H; ++i) {
                T acc = 0;
                for (int64_t h = 0; h < s.H; ++h) acc += ap[h * s.H + i] * g_r[h * s.H + i];
                delta[i * RB + r] = acc;
              }
              if (need_a) {
                for (int64_t e = 0; e < s.H * s.H; ++e) da_w[e] += g_r[e];
              }
            }
          }
          // Tile by tile of key columns, while each head's tile is in L2:
          //   dV^h += (A P)^h^T dO^h;  dS^i = P^i (sum_h A[h, i] dM^h - delta^i);
          //   dQ^i += scale dS^i K^i;  dK^i += scale dS^i^T Q^i.
          for (int64_t t0 = 0; t0 < s.L; t0 += TC) {
            const int64_t tc = std::min(TC, s.L - t0);
            const T* p_tile = probs.get() + t0;
            if (need_v) {
              mix<T>(tile.get(), hsm, ldm, ap, s.H, s.H, p_tile, hs, ld, R, tc);
              for (int64_t h = 0; h < s.H; ++h) {
                gemm<T>(true, false, tc, s.dv, R, T(1), tile.get() + h * hsm, ldm,
                        gp + ((b * s.H + h) * s.N + r0) * s.dv, s.dv, T(1), dv_w + (h * s.L + t0) * s.dv, s.dv);
              }
            }
            if (!need_qk) continue;
            mix<T>(tile.get(), hsm, ldm, atp, s.H, s.H, grad_mixed.get() + t0, hs, ld, R, tc, nullptr, 0, p_tile, hs, ld,
                   delta.get(), RB);
            for (int64_t i = 0; i < s.H; ++i) {
              const int64_t bh = b * s.H + i;
              T* ds = tile.get() + i * hsm;
              if (need_q) {
                gemm<T>(false, false, R, s.d, tc, scale, ds, ldm, kp + (bh * s.L + t0) * s.d, s.d,
                        t0 == 0 ? T(0) : T(1), dqp + (bh * s.N + r0) * s.d, s.d);
              }
              if (need_k) {
                gemm<T>(true, false, tc, s.d, R, scale, ds, ldm, qp + (bh * s.N + r0) * s.d, s.d, T(1),
                        dk_w + (i * s.L + t0) * s.d, s.d);
              }
            }
          }
        }
      }
    });
    for (int64_t w = 1; w < workers; ++w) {  // fold the private accumulators in, in worker order
      if (need_k && !dk_acc[w].empty()) {
        at::vec::map2<T>([](Vectorized<T> x, Vectorized<T> y) { return x + y; }, dk_b, dk_b, dk_acc[w].data(),
                         kv_numel * s.d);
      }
      if (need_v && !dv_acc[w].empty()) {
        at::vec::map2<T>([](Vectorized<T> x, Vectorized<T> y) { return x + y; }, dv_b, dv_b, dv_acc[w].data(),
                         kv_numel * s.dv);
      }
      if (need_a && !da_acc[w].empty()) {
        T* dap = da.data_ptr<T>();
        for (int64_t i = 0; i < s.H * s.H; ++i) dap[i] += da_acc[w][i];
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mixed_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& coeff,
                                                           const std::optional<at::Tensor>& mask, double scale,
                                                           int64_t block_rows, int64_t tile_cols) {
  check_inputs(q, k, v, coeff, mask);
  TORCH_CHECK(block_rows > 0 && tile_cols > 0, "block_rows and tile_cols must be positive");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dreamcoeff_mixed_attention_forward", [&] {
    forward_impl<scalar_t>(q, k, v, coeff, mask, static_cast<scalar_t>(scale), block_rows, tile_cols, out, lse);
  });
  return {out, lse};
}

// Gradients the caller does not need come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& coeff,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse, const at::Tensor& grad_out, double scale,
    bool need_q, bool need_k, bool need_v, bool need_a, int64_t block_rows, int64_t tile_cols) {
  check_inputs(q, k, v, coeff, mask);
  TORCH_CHECK(block_rows > 0 && tile_cols > 0, "block_rows and tile_cols must be positive");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == q.scalar_type() && lse.numel() == q.numel() / q.size(3),
              "lse must be the forward's (B, H, N) log-sum-exp");
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}),
              "grad_out must be contiguous (B, H, N, dv) in q's dtype");
  at::Tensor dq = need_q ? at::empty_like(q) : at::empty({0}, q.options());
  at::Tensor dk = need_k ? at::zeros_like(k) : at::empty({0}, q.options());
  at::Tensor dv = need_v ? at::zeros_like(v) : at::empty({0}, q.options());
  at::Tensor da = need_a ? at::zeros_like(coeff) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dreamcoeff_mixed_attention_backward", [&] {
    backward_impl<scalar_t>(q, k, v, coeff, mask, lse, grad_out, static_cast<scalar_t>(scale), need_q, need_k,
                            need_v, need_a, block_rows, tile_cols, dq, dk, dv, da);
  });
  return {dq, dk, dv, da};
}

TORCH_LIBRARY(dreamcoeff_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor coeff, Tensor? mask, float scale, int block_rows, "
        "int tile_cols) -> (Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor coeff, Tensor? mask, Tensor lse, Tensor grad_out, "
        "float scale, bool need_q, bool need_k, bool need_v, bool need_a, int block_rows, int tile_cols) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dreamcoeff_cpu, CPU, m) {
  m.impl("forward", &mixed_attention_forward);
  m.impl("backward", &mixed_attention_backward);
}
