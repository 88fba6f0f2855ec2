// dyconv's compiled CPU kernel (loaded by dyconv/_cpu_kernel.py, registered as torch.ops.dyconv_cpu.*):
//
// * depthwise_forward / depthwise_backward: dynamic depthwise convolution, channels innermost: one pass per sample
//   that mixes the sample's kernel from the K experts and convolves with it, and the matching backward.
// * one_sample_mix: batch-1 inference of any dynamic layer: the attention and the kernel's mixing in one call;
//   one_sample_attention: the attention alone; one_sample_depthwise: the attention and depthwise_forward;
//   depthwise_inference: the same for a batch (each sample's attention, kernel and convolution on one thread);
//   mix_rows: the "chunked" strategy's mixing of a chunk's kernels.
// * dense_forward: inference of an ungrouped stride-1 dynamic convolution with the mixing inside the convolution's
//   own tiles: each sample's kernel is mixed a few output channels and a few hundred inputs at a time into a
//   buffer that stays in cache, never written whole (see "Dense convolution" below: two loops, one with vectors of
//   positions, one with vectors of output channels); dense_backward: its gradients, the same way (the experts'
//   gradient of a large layer in reused memory: reused_memory.cpp).
//
// Tensors are read through raw pointers in the "channels innermost" memory order that channels_last (2-D),
// channels_last_3d (3-D) and a (B, L, C) buffer seen as (B, C, L) (1-D) share: element (b, c, d, h, w) of an
// input of spatial size (D, H, W) sits at ((b * D + d) * H + h) * W + w) * C + c. Every rank is handled as
// 3-D, with size-1 dimensions filled in, so one kernel serves Conv1d, Conv2d and Conv3d. The loops over
// channels are the innermost ones and vectorise.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// GCC vector extensions: AVX-512 registers where the machine has them (-march=native), 32-byte vectors elsewhere
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef T unaligned __attribute__((vector_size(kVectorBytes), aligned(sizeof(T)), may_alias));
  static constexpr int lanes = kVectorBytes / sizeof(T);
};

struct Geometry {
  int64_t batch, channels;
  int64_t in[3], out[3], kernel[3], stride[3], padding[3], dilation[3];
  int64_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
  int64_t in_row() const { return in[2] * channels; }  // elements of one input row (w, c)
  int64_t out_rows() const { return batch * out[0] * out[1]; }
  int64_t in_rows() const { return batch * in[0] * in[1]; }
};

std::vector<int64_t> three(const std::vector<int64_t>& v, int64_t fill) {
  std::vector<int64_t> r(3 - v.size(), fill);
  r.insert(r.end(), v.begin(), v.end());
  return r;
}

Geometry geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  const int64_t rank = x.dim() - 2;
  TORCH_CHECK(rank >= 1 && rank <= 3, "dyconv kernel: input must have 1 to 3 spatial dims, got ", rank);
  TORCH_CHECK(static_cast<int64_t>(kernel.size()) == rank && static_cast<int64_t>(stride.size()) == rank &&
                  static_cast<int64_t>(padding.size()) == rank && static_cast<int64_t>(dilation.size()) == rank,
              "dyconv kernel: kernel, stride, padding and dilation need one value per spatial dim");
  Geometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  auto in = three(std::vector<int64_t>(x.sizes().begin() + 2, x.sizes().end()), 1);
  auto k = three(kernel.vec(), 1), s = three(stride.vec(), 1), p = three(padding.vec(), 0),
       d = three(dilation.vec(), 1);
  for (int i = 0; i < 3; ++i) {
    g.in[i] = in[i];
    g.kernel[i] = k[i];
    g.stride[i] = s[i];
    g.padding[i] = p[i];
    g.dilation[i] = d[i];
    g.out[i] = (in[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) / s[i] + 1;
    TORCH_CHECK(g.out[i] > 0, "dyconv kernel: the output would be empty (input ", in[i], ", kernel ",
                k[i], ", padding ", p[i], ", dilation ", d[i], ")");
  }
  return g;
}

}  // namespace

namespace dyconv_cpu {

// Channels-innermost strides of a (B, C, *spatial) tensor (also one_sample.cpp's test for the depthwise route).
bool channels_innermost(const at::Tensor& t) {
  if (t.stride(1) != 1 && t.size(1) != 1) return false;
  int64_t expected = t.size(1);
  for (int64_t dim = t.dim() - 1; dim >= 2; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

// An uninitialised contiguous CPU tensor, large ones from reused memory (reused_memory.cpp)
at::Tensor reused_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace dyconv_cpu

namespace {

using dyconv_cpu::channels_innermost;

at::Tensor empty_channels_innermost(const at::Tensor& like, at::IntArrayRef sizes) {
  // (B, *spatial, C) memory seen as (B, C, *spatial): strided from the start, not a view (a layer's output may be
  // modified in place)
  std::vector<int64_t> strides(sizes.size());
  int64_t step = sizes[1];
  strides[1] = 1;
  for (int64_t dim = static_cast<int64_t>(sizes.size()) - 1; dim >= 2; --dim) {
    strides[dim] = step;
    step *= sizes[dim];
  }
  strides[0] = step;
  return at::empty_strided(sizes, strides, like.options());
}

// mixed[b][t][c] = sum_k attention[b][k] * experts[k][c][t]; mixed_bias[b][c] = sum_k attention[b][k] * bias[k][c]
template <typename T>
void mix(const T* attention, const T* experts, const T* bias, T* mixed, T* mixed_bias, int64_t batch, int64_t K,
         int64_t channels, int64_t taps) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* a = attention + b * K;
      T* m = mixed + b * taps * channels;
      for (int64_t t = 0; t < taps; ++t) {
        T* row = m + t * channels;
        for (int64_t c = 0; c < channels; ++c) row[c] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const T* e = experts + k * channels * taps + t;
          const T ak = a[k];
          for (int64_t c = 0; c < channels; ++c) row[c] += ak * e[c * taps];
        }
      }
      if (bias != nullptr) {
        T* mb = mixed_bias + b * channels;
        for (int64_t c = 0; c < channels; ++c) mb[c] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const T* bk = bias + k * channels;
          const T ak = a[k];
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) mb[c] += ak * bk[c];
        }
      }
    }
  });
}

// Calls f(tap0, row) for every kernel row (kd, kh) whose input row lies inside the input, for the output row
// (od, oh): tap0 is the row's first tap ((kd * KH + kh) * KW), row its input row within a sample (id * H + ih).
template <typename F>
inline void for_each_input_row(const Geometry& g, int64_t od, int64_t oh, F&& f) {
  for (int64_t kd = 0; kd < g.kernel[0]; ++kd) {
    const int64_t id = od * g.stride[0] - g.padding[0] + kd * g.dilation[0];
    if (id < 0 || id >= g.in[0]) continue;
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
      if (ih < 0 || ih >= g.in[1]) continue;
      f((kd * g.kernel[1] + kh) * g.kernel[2], id * g.in[1] + ih);
    }
  }
}

// The rows one row of a loop reads through the kernel rows (kd, kh) (in the forward, the input rows an output row
// (od, oh) reads): each kernel row's first tap and the row's start in the tensor read (room for every kernel row,
// reused from row to row).
template <typename T>
struct TapRows {
  int64_t count = 0;
  std::vector<int64_t> tap0;
  std::vector<const T*> row;
  explicit TapRows(const Geometry& g) : tap0(g.kernel[0] * g.kernel[1]), row(g.kernel[0] * g.kernel[1]) {}
};

// Calls f(std::integral_constant<int, NV>(), c0) for blocks of NV <= 4 whole vectors of channels starting at c0,
// covering the channels [0, C / lanes * lanes) (four vectors at a time, then the one to three left), and returns
// the first channel past the last whole vector (for the caller to handle one at a time).
template <typename T, typename F>
inline int64_t for_each_channel_block(int64_t C, F&& f) {
  constexpr int L = Vec<T>::lanes;
  const int64_t vectors = C / L;
  int64_t c0 = 0;
  for (; c0 + 4 * L <= C; c0 += 4 * L) f(std::integral_constant<int, 4>(), c0);
  switch (vectors % 4) {
    case 3: f(std::integral_constant<int, 3>(), c0); break;
    case 2: f(std::integral_constant<int, 2>(), c0); break;
    case 1: f(std::integral_constant<int, 1>(), c0); break;
    default: break;
  }
  return vectors * L;
}

// out[p][c] = (bias ? bias[c] : 0) + sum over the rows i and kernel columns kw with q = column(p, kw) >= 0 of
// w[tap0_i + kw][c] * row_i[q][c], for the P positions p of one row of a channels-innermost tensor (w (taps, C)).
// The forward (rows: the input rows an output row reads; column: the input column an output position reads through
// kw) and the input gradient (rows: the output-gradient rows an input row receives from; column: the output column
// that reaches an input position through kw) share it. Position by position (all of a position's channels before the
// next position's, so that the rows are read in memory order), each block of up to four vectors of channels is
// summed over every tap in registers, then stored once; channels past the last whole vector one at a time.
template <typename T, typename Column>
inline void tap_sums(const Geometry& g, const TapRows<T>& rows, const T* w, const T* bias, T* out, int64_t p0,
                     int64_t p1, Column column) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  const int64_t C = g.channels;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t tail = for_each_channel_block<T>(C, [&](auto nv, int64_t c0) {
      constexpr int NV = decltype(nv)::value;
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = bias != nullptr ? *reinterpret_cast<const U*>(bias + c0 + v * L) : V{};
      for (int64_t i = 0; i < rows.count; ++i) {
        const T* src = rows.row[i] + c0;
        const T* wrow = w + rows.tap0[i] * C + c0;
        for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
          const int64_t q = column(p, kw);
          if (q < 0) continue;
          const T* sp = src + q * C;
          const T* wp = wrow + kw * C;
          for (int v = 0; v < NV; ++v)
            acc[v] += *reinterpret_cast<const U*>(wp + v * L) * *reinterpret_cast<const U*>(sp + v * L);
        }
      }
      T* op = out + p * C + c0;
      for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(op + v * L) = acc[v];
    });
    if (tail == C) continue;
    T* op = out + p * C;
    for (int64_t c = tail; c < C; ++c) op[c] = bias != nullptr ? bias[c] : T(0);
    for (int64_t i = 0; i < rows.count; ++i) {
      for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
        const int64_t q = column(p, kw);
        if (q < 0) continue;
        const T* sp = rows.row[i] + q * C;
        const T* wp = w + (rows.tap0[i] + kw) * C;
        for (int64_t c = tail; c < C; ++c) op[c] += wp[c] * sp[c];
      }
    }
  }
}

// tap_sums for the positions [p0, p1) of a row where every kernel column reads inside the row, at a column that
// steps linearly: q = q0 + p * ps + kw * ks (the forward: -padding, stride, dilation; the input gradient at stride
// 1: padding, 1, -dilation). NP positions at a time, so that each kernel vector, loaded once, serves NP positions
// (tap_sums loads it for every position); p1 - p0 a multiple of NP.
template <typename T, int NP>
__attribute__((noinline)) void tap_sums_run(const Geometry& g, const TapRows<T>& rows, const T* w, const T* bias,
                                            T* out, int64_t p0, int64_t p1, int64_t q0, int64_t ps, int64_t ks) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  const int64_t C = g.channels, KW = g.kernel[2], step = ps * C;
  for (int64_t p = p0; p < p1; p += NP) {
    const int64_t tail = for_each_channel_block<T>(C, [&](auto nv, int64_t c0) {
      constexpr int NV = decltype(nv)::value;
      V acc[NP][NV];
      for (int v = 0; v < NV; ++v) {
        const V init = bias != nullptr ? *reinterpret_cast<const U*>(bias + c0 + v * L) : V{};
        for (int j = 0; j < NP; ++j) acc[j][v] = init;
      }
      for (int64_t i = 0; i < rows.count; ++i) {
        const T* src = rows.row[i] + (q0 + p * ps) * C + c0;
        const T* wrow = w + rows.tap0[i] * C + c0;
        for (int64_t kw = 0; kw < KW; ++kw) {
          const T* sp = src + kw * ks * C;
          const T* wp = wrow + kw * C;
          V wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const U*>(wp + v * L);
          for (int j = 0; j < NP; ++j)
            for (int v = 0; v < NV; ++v) acc[j][v] += wv[v] * *reinterpret_cast<const U*>(sp + j * step + v * L);
        }
      }
      for (int j = 0; j < NP; ++j)
        for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(out + (p + j) * C + c0 + v * L) = acc[j][v];
    });
    for (int64_t c = tail; c < C; ++c) {
      for (int j = 0; j < NP; ++j) {
        T a = bias != nullptr ? bias[c] : T(0);
        for (int64_t i = 0; i < rows.count; ++i) {
          const T* src = rows.row[i] + (q0 + (p + j) * ps) * C + c;
          const T* wp = w + rows.tap0[i] * C + c;
          for (int64_t kw = 0; kw < KW; ++kw) a += wp[kw * C] * src[kw * ks * C];
        }
        out[(p + j) * C + c] = a;
      }
    }
  }
}

// The positions of a row of P whose kernel columns all read inside it ([lo, hi), lo = hi where none), for a column
// function as tap_sums takes
template <typename Column>
inline std::pair<int64_t, int64_t> inner_positions(const Geometry& g, int64_t P, Column column) {
  auto inside = [&](int64_t p) {
    for (int64_t kw = 0; kw < g.kernel[2]; ++kw)
      if (column(p, kw) < 0) return false;
    return true;
  };
  int64_t lo = 0;
  while (lo < P && !inside(lo)) ++lo;
  int64_t hi = lo;
  while (hi < P && inside(hi)) ++hi;
  return {lo, hi};
}

// tap_sums over a whole row of P positions: the inner positions (where every kernel column reads inside the row,
// the column q0 + p * ps + kw * ks) in runs of kRunPositions through tap_sums_run, the rest position by position.
// Four positions hold 16 accumulators of four vectors of channels, of the 32 AVX-512 registers; two with 16.
constexpr int kRunPositions = kVectorBytes == 64 ? 4 : 2;

template <typename T, typename Column>
inline void row_tap_sums(const Geometry& g, const TapRows<T>& rows, const T* w, const T* bias, T* out, int64_t P,
                         int64_t q0, int64_t ps, int64_t ks, Column column) {
  const auto inner = inner_positions(g, P, column);
  const int64_t lo = inner.first, hi = lo + (inner.second - inner.first) / kRunPositions * kRunPositions;
  tap_sums(g, rows, w, bias, out, 0, lo, column);
  if (hi > lo) tap_sums_run<T, kRunPositions>(g, rows, w, bias, out, lo, hi, q0, ps, ks);
  tap_sums(g, rows, w, bias, out, hi, P, column);
}

// One output row r (over batch, depth and height) of y = conv(x[b], w) + bias, w and bias the row's sample's own
// mixed kernel (taps, C) and bias (C, or none).
template <typename T>
inline void forward_row(const Geometry& g, const T* x, const T* w, const T* bias, T* y, int64_t r,
                        TapRows<T>& rows) {
  const int64_t b = r / (g.out[0] * g.out[1]);
  const int64_t od = (r / g.out[1]) % g.out[0], oh = r % g.out[1];
  rows.count = 0;
  for_each_input_row(g, od, oh, [&](int64_t tap0, int64_t row) {
    rows.tap0[rows.count] = tap0;
    rows.row[rows.count++] = x + (b * g.in[0] * g.in[1] + row) * g.in_row();
  });
  row_tap_sums(g, rows, w, bias, y + r * g.out[2] * g.channels, g.out[2], -g.padding[2], g.stride[2],
               g.dilation[2], [&](int64_t ow, int64_t kw) -> int64_t {
                 const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
                 return iw < 0 || iw >= g.in[2] ? -1 : iw;
               });
}

template <typename T>
void forward_rows(const Geometry& g, const T* x, const T* mixed, const T* mixed_bias, T* y) {
  const int64_t C = g.channels, taps = g.taps(), rows = g.out[0] * g.out[1];
  // a few thousand outputs per task at least: tiny outputs stay on one thread
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.out[2] * C));
  at::parallel_for(0, g.out_rows(), grain, [&](int64_t begin, int64_t end) {
    TapRows<T> scratch(g);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows;
      forward_row(g, x, mixed + b * taps * C, mixed_bias != nullptr ? mixed_bias + b * C : nullptr, y, r, scratch);
    }
  });
}

// Calls f(tap0, row) for every kernel row (kd, kh) through which the input row (id, ih) reaches an output row inside
// the output: tap0 is the kernel row's first tap, row that output row within a sample (od * OH + oh).
template <typename F>
inline void for_each_output_row(const Geometry& g, int64_t id, int64_t ih, F&& f) {
  for (int64_t kd = 0; kd < g.kernel[0]; ++kd) {
    const int64_t nd = id + g.padding[0] - kd * g.dilation[0];
    if (nd < 0 || nd % g.stride[0] != 0 || nd / g.stride[0] >= g.out[0]) continue;
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      const int64_t nh = ih + g.padding[1] - kh * g.dilation[1];
      if (nh < 0 || nh % g.stride[1] != 0 || nh / g.stride[1] >= g.out[1]) continue;
      f((kd * g.kernel[1] + kh) * g.kernel[2], nd / g.stride[0] * g.out[1] + nh / g.stride[1]);
    }
  }
}

// The output position of input column iw through kernel column kw, or -1 where none
inline int64_t output_column(const Geometry& g, int64_t iw, int64_t kw) {
  const int64_t nw = iw + g.padding[2] - kw * g.dilation[2];
  if (nw < 0 || nw % g.stride[2] != 0 || nw / g.stride[2] >= g.out[2]) return -1;
  return nw / g.stride[2];
}

// grad_x[b, i] = sum over taps t and output positions o with o * stride - padding + t * dilation = i of
// mixed[b][t] * grad_y[b, o]: gathered per input row (tap_sums), so that no two threads write the same element.
template <typename T>
void grad_input_rows(const Geometry& g, const T* gy, const T* mixed, T* gx) {
  const int64_t C = g.channels, taps = g.taps();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.in[2] * C));
  at::parallel_for(0, g.in_rows(), grain, [&](int64_t begin, int64_t end) {
    TapRows<T> rows(g);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (g.in[0] * g.in[1]);
      const int64_t id = (r / g.in[1]) % g.in[0], ih = r % g.in[1];
      rows.count = 0;
      for_each_output_row(g, id, ih, [&](int64_t tap0, int64_t row) {
        rows.tap0[rows.count] = tap0;
        rows.row[rows.count++] = gy + (b * g.out[0] * g.out[1] + row) * g.out[2] * C;
      });
      auto column = [&](int64_t iw, int64_t kw) { return output_column(g, iw, kw); };
      T* out = gx + r * g.in_row();
      if (g.stride[2] == 1)
        row_tap_sums(g, rows, mixed + b * taps * C, static_cast<const T*>(nullptr), out, g.in[2], g.padding[2], 1,
                     -g.dilation[2], column);
      else
        tap_sums(g, rows, mixed + b * taps * C, static_cast<const T*>(nullptr), out, 0, g.in[2], column);
    }
  });
}

// acc[(tap0 + kw) * C + c0 + j] += sum over output columns ow of grad_y[ow, c0 + j] * x[ow * stride - padding +
// kw * dilation, c0 + j], for every kw and j < NV vectors: one output row against one of its input rows, each tap's
// sum over the row in registers
template <typename T, int NV>
inline void grad_mixed_block(const Geometry& g, const T* gyrow, const T* xrow, int64_t tap0, T* acc, int64_t c0) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  const int64_t C = g.channels;
  for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
    V sum[NV];
    for (int v = 0; v < NV; ++v) sum[v] = V{};
    for (int64_t ow = 0; ow < g.out[2]; ++ow) {
      const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
      if (iw < 0 || iw >= g.in[2]) continue;
      const T* gp = gyrow + ow * C + c0;
      const T* xp = xrow + iw * C + c0;
      for (int v = 0; v < NV; ++v)
        sum[v] += *reinterpret_cast<const U*>(gp + v * L) * *reinterpret_cast<const U*>(xp + v * L);
    }
    T* ap = acc + (tap0 + kw) * C + c0;
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<U*>(ap + v * L) = *reinterpret_cast<const U*>(ap + v * L) + sum[v];
  }
}

// grad_mixed[b][t][c] = sum over output positions o of grad_y[b, o, c] * x[b, o * stride - padding + t * dilation, c].
// Each sample's output rows are cut into blocks (enough blocks in all for every thread); each block sums into
// its own partial buffer, and the partials of a sample are added in a fixed order (deterministic results).
template <typename T>
void grad_mixed_rows(const Geometry& g, const T* gy, const T* x, T* gw) {
  const int64_t C = g.channels, taps = g.taps(), rows = g.out[0] * g.out[1];
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, (2 * threads + g.batch - 1) / g.batch));
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  std::vector<T> partial(static_cast<size_t>(g.batch * blocks * taps * C));
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      T* acc = partial.data() + task * taps * C;
      std::fill(acc, acc + taps * C, T(0));
      const int64_t r1 = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t r = block * rows_per_block; r < r1; ++r) {
        const int64_t od = r / g.out[1], oh = r % g.out[1];
        const T* gyrow = gy + (b * rows + r) * g.out[2] * C;
        for_each_input_row(g, od, oh, [&](int64_t tap0, int64_t row) {
          const T* xrow = x + (b * g.in[0] * g.in[1] + row) * g.in_row();
          const int64_t c0 = for_each_channel_block<T>(C, [&](auto nv, int64_t c) {
            grad_mixed_block<T, decltype(nv)::value>(g, gyrow, xrow, tap0, acc, c);
          });
          for (int64_t kw = 0; kw < g.kernel[2] && c0 < C; ++kw) {
            T* ap = acc + (tap0 + kw) * C;
            for (int64_t ow = 0; ow < g.out[2]; ++ow) {
              const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
              if (iw < 0 || iw >= g.in[2]) continue;
              const T* xp = xrow + iw * C;
              const T* gyp = gyrow + ow * C;
              for (int64_t c = c0; c < C; ++c) ap[c] += gyp[c] * xp[c];
            }
          }
        });
      }
    }
  });
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* out = gw + b * taps * C;
      const T* first = partial.data() + b * blocks * taps * C;
      std::copy(first, first + taps * C, out);
      for (int64_t block = 1; block < blocks; ++block) {
        const T* p = first + block * taps * C;
#pragma omp simd
        for (int64_t i = 0; i < taps * C; ++i) out[i] += p[i];
      }
    }
  });
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dyconv depthwise kernel: ", name, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dyconv depthwise kernel: ", name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(channels_innermost(x), "dyconv depthwise kernel: ", name,
              " must have its channels innermost in memory (channels_last), got strides ", x.strides());
}

// x (B, C, *spatial) channels innermost; experts (K, C, 1, *kernel); attention (B, K); bias (K, C) or none.
// Returns (y, mixed): y (B, C, *out) channels innermost, mixed (B, taps, C) the per-sample kernels.
std::tuple<at::Tensor, at::Tensor> depthwise_forward(const at::Tensor& x, const at::Tensor& experts,
                                                     const at::Tensor& attention,
                                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(x, "input");
  TORCH_CHECK(experts.dim() == x.dim() + 1 && experts.size(1) == x.size(1) && experts.size(2) == 1,
              "dyconv depthwise kernel: experts must be (K, C, 1, *kernel) with C = ", x.size(1), ", got ",
              experts.sizes());
  const int64_t K = experts.size(0);
  TORCH_CHECK(attention.dim() == 2 && attention.size(0) == x.size(0) && attention.size(1) == K,
              "dyconv depthwise kernel: attention must be (", x.size(0), ", ", K, "), got ", attention.sizes());
  auto g = geometry(x, experts.sizes().slice(3), stride, padding, dilation);
  const int64_t C = g.channels, taps = g.taps();
  auto e = experts.to(x.scalar_type()).contiguous();
  auto a = attention.to(x.scalar_type()).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == C,
                "dyconv depthwise kernel: bias must be (", K, ", ", C, "), got ", bias->sizes());
    b = bias->to(x.scalar_type()).contiguous();
  }
  auto mixed = at::empty({g.batch, taps, C}, x.options());
  auto mixed_bias = b.defined() ? at::empty({g.batch, C}, x.options()) : at::Tensor();
  std::vector<int64_t> out_sizes{g.batch, C};
  for (int64_t i = 3 - (x.dim() - 2); i < 3; ++i) out_sizes.push_back(g.out[i]);
  auto y = empty_channels_innermost(x, out_sizes);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_depthwise_forward", [&] {
    mix<scalar_t>(a.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                  mixed.data_ptr<scalar_t>(), b.defined() ? mixed_bias.data_ptr<scalar_t>() : nullptr, g.batch, K,
                  C, taps);
    forward_rows<scalar_t>(g, x.data_ptr<scalar_t>(), mixed.data_ptr<scalar_t>(),
                           b.defined() ? mixed_bias.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
  });
  return std::make_tuple(y, mixed);
}

// grad_y and x channels innermost, mixed (B, taps, C) from the forward; kernel sizes given.
// Returns (grad_x or an empty tensor, grad_mixed (B, taps, C) or an empty tensor).
std::tuple<at::Tensor, at::Tensor> depthwise_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& mixed, at::IntArrayRef kernel,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool need_input, bool need_mixed) {
  check_input(x, "input");
  check_input(grad_y, "grad_output");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && mixed.scalar_type() == x.scalar_type(),
              "dyconv depthwise kernel: grad_output, input and mixed kernels must share a dtype");
  auto g = geometry(x, kernel, stride, padding, dilation);
  TORCH_CHECK(mixed.is_contiguous() && mixed.dim() == 3 && mixed.size(0) == g.batch && mixed.size(1) == g.taps() &&
                  mixed.size(2) == g.channels,
              "dyconv depthwise kernel: mixed kernels must be contiguous (", g.batch, ", ", g.taps(), ", ",
              g.channels, "), got ", mixed.sizes());
  for (int i = 0; i < grad_y.dim() - 2; ++i) {
    TORCH_CHECK(grad_y.size(i + 2) == g.out[3 - (grad_y.dim() - 2) + i],
                "dyconv depthwise kernel: grad_output has the wrong spatial size ", grad_y.sizes());
  }
  at::Tensor gx, gw;
  if (need_input) gx = empty_channels_innermost(x, x.sizes());
  if (need_mixed) gw = at::empty({g.batch, g.taps(), g.channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_depthwise_backward", [&] {
    if (need_input)
      grad_input_rows<scalar_t>(g, grad_y.data_ptr<scalar_t>(), mixed.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
    if (need_mixed)
      grad_mixed_rows<scalar_t>(g, grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>());
  });
  return std::make_tuple(gx, gw);
}

// ---------------------------------------------------------------------------------------------------------------
// Batch-1 inference of any dynamic layer (dyconv/_one_sample.py): the attention and the mixing in one call.
// attention = softmax(scale * (W2 relu(W1 mean(x) + b1) + b2)); out = sum_k attention[k] * experts[k] (experts
// (K, N) contiguous, out N contiguous, e.g. the thread's workspace); returns the mixed bias (or an empty tensor).
// The input's sums, the hidden layer and the logits are carried in double (channels_last input summed in runs of 64
// positions in its own dtype first, the linear layers' products summed in vectors of its dtype, each row's lanes in
// double).

// sums[c0 + i] += the sum of rows [p0, p1) of a (positions, C) matrix at columns c0 + i, i < NV vectors: summed
// in registers (a short run of positions, so the partial sums stay exact enough), then added in double
template <typename T, int NV>
inline void add_column_sums(const T* data, int64_t C, int64_t c0, int64_t p0, int64_t p1, double* sums) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = data + p * C + c0;
    for (int v = 0; v < NV; ++v) acc[v] += *reinterpret_cast<const U*>(row + v * L);
  }
  for (int v = 0; v < NV; ++v)
    for (int i = 0; i < L; ++i) sums[c0 + v * L + i] += static_cast<double>(acc[v][i]);
}

// The channel sums of channels-innermost data, (positions, C) rows, in `blocks` blocks of positions (threads): each
// block sums runs of kSumRun rows in registers, four vectors of channels at a time, into its own row of double
// partial sums; the blocks' rows are added in a fixed order.
template <typename T>
void channel_sums_rows(const T* data, int64_t positions, int64_t C, int64_t blocks, double* sums) {
  std::fill(sums, sums + C, 0.0);
  constexpr int64_t kSumRun = 64;
  const int64_t per_block = (positions + blocks - 1) / blocks;
  std::vector<double> partial(static_cast<size_t>(blocks * C), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      std::vector<double> acc(static_cast<size_t>(C), 0.0);  // the thread's own memory, copied out once
      const int64_t p_end = std::min(positions, (blk + 1) * per_block);
      for (int64_t p0 = blk * per_block; p0 < p_end; p0 += kSumRun) {
        const int64_t p1 = std::min(p_end, p0 + kSumRun);
        const int64_t tail = for_each_channel_block<T>(C, [&](auto nv, int64_t c0) {
          add_column_sums<T, decltype(nv)::value>(data, C, c0, p0, p1, acc.data());
        });
        for (int64_t c = tail; c < C; ++c) {
          double a = 0.0;
          for (int64_t p = p0; p < p1; ++p) a += static_cast<double>(data[p * C + c]);
          acc[c] += a;
        }
      }
      std::copy(acc.begin(), acc.end(), partial.begin() + blk * C);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t c = 0; c < C; ++c) sums[c] += partial[blk * C + c];
}

template <typename T>
void channel_sums(const at::Tensor& x, double* sums) {
  const int64_t C = x.size(1), positions = x.numel() / std::max<int64_t>(C, 1);
  const T* data = x.data_ptr<T>();
  if (channels_innermost(x)) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), positions / 1024));
    channel_sums_rows<T>(data, positions, C, blocks, sums);
  } else {
    std::fill(sums, sums + C, 0.0);
    // contiguous: one row of positions per channel
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const T* row = data + c * positions;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < positions; ++p) acc += static_cast<double>(row[p]);
        sums[c] = acc;
      }
    });
  }
}

template <typename T>
void linear(const T* w, const T* b, const double* in, double* out, int64_t rows, int64_t cols, double alpha,
            double beta) {
  // out = alpha * (w @ in) + beta * b: the products summed in vectors of T, four rows at a time (four independent
  // sums in flight), as PyTorch's own matrix-vector product sums them; each row's lanes added in double
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  std::vector<T> x(in, in + cols);
  const int64_t whole = cols / L * L;
  auto finish = [&](int64_t r, const V& acc) {
    double total = 0.0;
    for (int i = 0; i < L; ++i) total += static_cast<double>(acc[i]);
    const T* wr = w + r * cols;
    for (int64_t c = whole; c < cols; ++c) total += static_cast<double>(wr[c]) * in[c];
    out[r] = alpha * total + beta * static_cast<double>(b[r]);
  };
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* w0 = w + r * cols;
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t c = 0; c < whole; c += L) {
      const V xv = *reinterpret_cast<const U*>(x.data() + c);
      a0 += *reinterpret_cast<const U*>(w0 + c) * xv;
      a1 += *reinterpret_cast<const U*>(w0 + cols + c) * xv;
      a2 += *reinterpret_cast<const U*>(w0 + 2 * cols + c) * xv;
      a3 += *reinterpret_cast<const U*>(w0 + 3 * cols + c) * xv;
    }
    finish(r, a0);
    finish(r + 1, a1);
    finish(r + 2, a2);
    finish(r + 3, a3);
  }
  for (; r < rows; ++r) {
    const T* wr = w + r * cols;
    V acc{};
    for (int64_t c = 0; c < whole; c += L)
      acc += *reinterpret_cast<const U*>(wr + c) * *reinterpret_cast<const U*>(x.data() + c);
    finish(r, acc);
  }
}

// The attention from a sample's channel sums over its positions (as sample_attention below)
template <typename T>
void attention_from_sums(const double* sums, double positions, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2, double scale, T* a) {
  const int64_t C = w1.size(1), H = w1.size(0), K = w2.size(0);
  std::vector<double> hidden(H), logits(K);
  linear<T>(w1.data_ptr<T>(), b1.data_ptr<T>(), sums, hidden.data(), H, C, 1.0 / positions, 1.0);
  for (auto& h : hidden) h = h > 0.0 ? h : 0.0;
  linear<T>(w2.data_ptr<T>(), b2.data_ptr<T>(), hidden.data(), logits.data(), K, H, scale, scale);
  const double top = *std::max_element(logits.begin(), logits.end());
  double total = 0.0;
  for (auto& l : logits) total += (l = std::exp(l - top));
  for (int64_t k = 0; k < K; ++k) a[k] = static_cast<T>(logits[k] / total);
}

// The attention of one sample x (1, C, *spatial): softmax(scale * (W2 relu(W1 mean(x) + b1) + b2)) into a (K).
template <typename T>
void sample_attention(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2, double scale, T* a) {
  const int64_t C = x.size(1);
  std::vector<double> sums(C);
  channel_sums<T>(x, sums.data());
  const double positions = static_cast<double>(std::max<int64_t>(1, x.numel() / std::max<int64_t>(C, 1)));
  attention_from_sums<T>(sums.data(), positions, w1, b1, w2, b2, scale, a);
}

void check_attention(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->device().is_cpu(),
                "dyconv: the attention's parameters must be contiguous CPU tensors of x's dtype");
  }
  const int64_t H = w1.size(0), K = w2.size(0);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == x.size(1) && b1.numel() == H && w2.dim() == 2 && w2.size(1) == H &&
                  b2.numel() == K,
              "dyconv: the attention's shapes do not fit (x ", x.sizes(), ", fc1 ", w1.sizes(), ", fc2 ", w2.sizes(),
              ")");
}

// m[k] = sum_e a[e] * rows[e][k], k < kc: four experts (the paper's K) in one pass, one store per element;
// other counts one pass per expert
template <typename T>
inline void mix_row(T* m, const T* const* rows, const T* a, int64_t E, int64_t kc) {
  if (E == 4) {
    const T *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
    for (int64_t k = 0; k < kc; ++k) m[k] = a0 * r0[k] + a1 * r1[k] + a2 * r2[k] + a3 * r3[k];
    return;
  }
  const T a0 = a[0];
  const T* r0 = rows[0];
#pragma omp simd
  for (int64_t k = 0; k < kc; ++k) m[k] = a0 * r0[k];
  for (int64_t e = 1; e < E; ++e) {
    const T ae = a[e];
    const T* re = rows[e];
#pragma omp simd
    for (int64_t k = 0; k < kc; ++k) m[k] += ae * re[k];
  }
}

template <typename scalar_t>
void one_sample_mix_impl(const at::Tensor& xc, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                         const at::Tensor& b2, double scale, const at::Tensor& experts, at::Tensor& out,
                         const c10::optional<at::Tensor>& bias, at::Tensor& mixed_bias) {
  const int64_t K = w2.size(0), N = experts.size(1);
  std::vector<scalar_t> a(K);
  sample_attention<scalar_t>(xc, w1, b1, w2, b2, scale, a.data());
  const scalar_t* e = experts.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  // in tiles of 2048 elements (for K = 4 one pass over the four experts side by side, each element of out written
  // once; for other counts a pass per expert over a tile of out that stays in L1)
  constexpr int64_t tile = 2048;
  at::parallel_for(0, N, 1 << 14, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> rows(K);
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      for (int64_t k = 0; k < K; ++k) rows[k] = e + k * N + t0;
      mix_row<scalar_t>(o + t0, rows.data(), a.data(), K, std::min(tile, end - t0));
    }
  });
  if (mixed_bias.defined()) {
    const at::Tensor bc = bias->contiguous();
    const scalar_t* bb = bc.data_ptr<scalar_t>();
    scalar_t* mb = mixed_bias.data_ptr<scalar_t>();
    const int64_t Co = bc.size(1);
    for (int64_t c = 0; c < Co; ++c) {
      scalar_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += a[k] * bb[k * Co + c];
      mb[c] = acc;
    }
  }
}

// out[b] = sum_k attention[b][k] * experts[k] for every row b: attention (B, K), experts (K, N) with contiguous rows,
// out (B, N) contiguous, one dtype. The "chunked" strategy's mixing on the CPU (dyconv/_chunked.py: mix), where
// torch.mm's (B x K) @ (K x N), a matrix product with an inner dimension of four, took 2-4 times as long on this
// machine (benchmarks/mixing.py --part chunk-mix). In tiles of kMixTile elements: each thread takes a range of tiles
// and mixes every row's tile from the experts' rows while they are in L1 (K = 4: one pass over the four rows at once,
// each element of out written once).
constexpr int64_t kMixTile = 1024;

void mix_rows(const at::Tensor& attention, const at::Tensor& experts, at::Tensor& out) {
  const auto dtype = experts.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dyconv mix_rows: float32 or float64, got ", dtype);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&attention, &experts, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 2,
                "dyconv mix_rows: attention, experts and out must be 2-D CPU tensors of one dtype");
  }
  TORCH_CHECK(attention.size(1) == experts.size(0) && out.size(0) == attention.size(0) &&
                  out.size(1) == experts.size(1) && out.is_contiguous() && experts.stride(1) == 1,
              "dyconv mix_rows: need attention (B, K), experts (K, N) with contiguous rows and out (B, N) contiguous, "
              "got ", attention.sizes(), ", ", experts.sizes(), " (strides ", experts.strides(), "), ", out.sizes());
  const auto a = attention.contiguous();
  const int64_t B = out.size(0), K = experts.size(0), N = out.size(1), tiles = (N + kMixTile - 1) / kMixTile;
  if (B == 0 || N == 0) return;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dyconv_mix_rows", [&] {
    const scalar_t* ad = a.data_ptr<scalar_t>();
    const scalar_t* e = experts.data_ptr<scalar_t>();
    const int64_t es = experts.stride(0);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tiles * B, B, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows(K);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t0 = (i / B) * kMixTile, b = i % B;
        for (int64_t k = 0; k < K; ++k) rows[k] = e + k * es + t0;
        mix_row<scalar_t>(o + b * N + t0, rows.data(), ad + b * K, K, std::min(kMixTile, N - t0));
      }
    });
  });
}

// The attention (1, K) of one sample x (1, C, *spatial), as one_sample_mix computes it.
at::Tensor one_sample_attention(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.size(0) == 1 && x.dim() >= 3,
              "dyconv one_sample_attention: x must be one CPU sample (1, C, *spatial), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dyconv one_sample_attention: float32 or float64, got ",
              dtype);
  check_attention(x, w1, b1, w2, b2);
  auto out = at::empty({1, w2.size(0)}, x.options());
  const at::Tensor xc = (channels_innermost(x) || x.is_contiguous()) ? x : x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "dyconv_one_sample_attention", [&] {
    sample_attention<scalar_t>(xc, w1, b1, w2, b2, scale, out.data_ptr<scalar_t>());
  });
  return out;
}

// Batch-1 inference of a depthwise layer on channels-innermost input: the attention (as one_sample_attention), then
// depthwise_forward, in one call. Returns y (1, C, *out), channels innermost.
at::Tensor one_sample_depthwise(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                const at::Tensor& b2, double scale, const at::Tensor& experts,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  TORCH_CHECK(x.size(0) == 1, "dyconv one_sample_depthwise: x must be one sample (1, C, *spatial), got ", x.sizes());
  check_input(x, "input");
  check_attention(x, w1, b1, w2, b2);
  auto attention = at::empty({1, w2.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_one_sample_depthwise", [&] {
    sample_attention<scalar_t>(x, w1, b1, w2, b2, scale, attention.data_ptr<scalar_t>());
  });
  return std::get<0>(depthwise_forward(x, experts, attention, bias, stride, padding, dilation));
}

// Inference of a depthwise layer on a channels-innermost batch in one call. Where the threads divide the samples
// evenly enough (the busiest thread at most 5/4 of the mean), sample by sample: each sample's attention (as
// one_sample_attention), its mixed kernel, then its convolution (depthwise_forward's rows) on one thread, while the
// sample's input is still in that core's caches (the batched path reads the input twice from memory: for the
// attention's mean, then for the convolution). Otherwise every sample's attention and kernel first (samples divided
// among the threads), then the convolution's rows divided among them. Returns y (B, C, *out), channels innermost.
at::Tensor depthwise_inference(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                               const at::Tensor& b2, double scale, const at::Tensor& experts,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation) {
  check_input(x, "input");
  check_attention(x, w1, b1, w2, b2);
  const int64_t K = w2.size(0);
  TORCH_CHECK(experts.dim() == x.dim() + 1 && experts.size(0) == K && experts.size(1) == x.size(1) &&
                  experts.size(2) == 1 && experts.scalar_type() == x.scalar_type(),
              "dyconv depthwise_inference: experts must be (", K, ", ", x.size(1), ", 1, *kernel) of x's dtype, got ",
              experts.sizes(), " ", experts.scalar_type());
  auto g = geometry(x, experts.sizes().slice(3), stride, padding, dilation);
  const int64_t C = g.channels, taps = g.taps();
  const auto e = experts.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == C && bias->scalar_type() == x.scalar_type(),
                "dyconv depthwise_inference: bias must be (", K, ", ", C, ") of x's dtype, got ", bias->sizes());
    b = bias->contiguous();
  }
  std::vector<int64_t> out_sizes{g.batch, C};
  for (int64_t i = 3 - (x.dim() - 2); i < 3; ++i) out_sizes.push_back(g.out[i]);
  auto y = empty_channels_innermost(x, out_sizes);
  const int64_t positions = g.in[0] * g.in[1] * g.in[2], rows = g.out[0] * g.out[1];
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_depthwise_inference", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* ed = e.data_ptr<scalar_t>();
    const scalar_t* bd = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yd = y.data_ptr<scalar_t>();
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const bool by_sample = 4 * ((g.batch + threads - 1) / threads) * threads <= 5 * g.batch;
    // each sample's kernel and bias: the thread's own buffers (by_sample) or the batch's
    std::vector<scalar_t> kernels(by_sample ? 0 : g.batch * taps * C), biases(by_sample || !bd ? 0 : g.batch * C);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> sums(C);
      std::vector<scalar_t> a(K), own(by_sample ? taps * C : 0), own_bias(by_sample && bd ? C : 0);
      TapRows<scalar_t> scratch(g);
      for (int64_t s = begin; s < end; ++s) {
        scalar_t* m = by_sample ? own.data() : kernels.data() + s * taps * C;
        scalar_t* mb = bd == nullptr ? nullptr : by_sample ? own_bias.data() : biases.data() + s * C;
        channel_sums_rows<scalar_t>(xd + s * positions * C, positions, C, 1, sums.data());
        attention_from_sums<scalar_t>(sums.data(), static_cast<double>(positions), w1, b1, w2, b2, scale, a.data());
        mix<scalar_t>(a.data(), ed, bd, m, mb, 1, K, C, taps);
        if (by_sample)
          for (int64_t r = s * rows; r < (s + 1) * rows; ++r) forward_row(g, xd, m, mb, yd, r, scratch);
      }
    });
    if (!by_sample) forward_rows<scalar_t>(g, xd, kernels.data(), bd ? biases.data() : nullptr, yd);
  });
  return y;
}

at::Tensor one_sample_mix(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2, double scale, const at::Tensor& experts, at::Tensor& out,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.size(0) == 1 && x.dim() >= 3,
              "dyconv one_sample_mix: x must be one CPU sample (1, C, *spatial), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dyconv one_sample_mix: float32 or float64, got ", dtype);
  check_attention(x, w1, b1, w2, b2);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&experts, &out}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(),
                "dyconv one_sample_mix: experts and out must be contiguous CPU tensors of x's dtype");
  }
  const int64_t K = w2.size(0), N = experts.size(1);
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == K && out.numel() == N,
              "dyconv one_sample_mix: experts must be (", K, ", N) and out N elements, got experts ", experts.sizes(),
              ", out ", out.sizes());
  at::Tensor mixed_bias;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 2 && bias->size(0) == K,
                "dyconv one_sample_mix: bias must be (", K, ", C_out) of x's dtype, got ", bias->sizes());
    mixed_bias = at::empty({bias->size(1)}, x.options());
  }
  const at::Tensor xc = (channels_innermost(x) || x.is_contiguous()) ? x : x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "dyconv_one_sample_mix", [&] {
    one_sample_mix_impl<scalar_t>(xc, w1, b1, w2, b2, scale, experts, out, bias, mixed_bias);
  });
  return mixed_bias.defined() ? mixed_bias : at::empty({0}, x.options());
}

// ---------------------------------------------------------------------------------------------------------------
// Dense convolution (groups 1, stride 1, zero padding, any dilation), inference: y[b] = conv(x[b], sum_k a[b,k]
// experts[k]) + sum_k a[b,k] bias[k].
//
// Each sample is copied, zero-padded, into planes of (Dp, Hp, Wp) per input channel. An output position (od, oh, ow)
// is given the index q = (od * Hp + oh) * Wp + ow of the padded volume, so every tap reads the input at q plus a
// constant offset, and one kernel element multiplies a contiguous vector of positions: the register tile holds NR
// output channels x MV vectors of positions and, per kernel element, broadcasts NR mixed weights and loads MV input
// vectors. Positions with ow >= OW or oh >= OH are computed too and dropped (the price of the shift; the padded
// planes carry enough slack that those reads stay inside the buffer).
//
// Work is split over blocks of NR output channels. For each block, KC kernel elements at a time, the K experts' rows
// are read once for the whole batch (at batch > 1 copied into one (K, NR, KC) buffer, so that a sample's mixing is one
// pass) and mixed for each sample in turn (from L1) into a small buffer (the mixed kernel is never written out whole),
// used at once by every position of that sample; each sample's partial sums for the block wait in a buffer between the
// KC steps. KC is a whole number of vectors, so that every row of the buffer is mixed in whole vectors. The kernel
// elements are taken in the experts' own memory order (input channel then tap for contiguous experts, tap then input
// channel for channels_last ones), so each expert row is read contiguously; a table gives each kernel element's input
// offset. (For channels_last experts at batch > 1 a step of one tap's KC input channels reads KC channel planes of
// every sample, more than L2 holds for a batch: "auto" takes cl_run there, channels_loop_pays.)

constexpr int kTileChannels = 6;  // NR: output channels per register tile
constexpr int kTileVectors = 4;   // MV: vectors of positions per register tile
constexpr int64_t kMixedBytes = 8192;  // the mixed-kernel buffer of a block (NR x KC elements)

// out[r][j] = (first ? 0 : out[r][j]) + sum_k w[r * ldw + k] * x[off[k] + j], r < NR, j < MVn vectors
template <typename T, int MVn>
inline void dense_tile(const T* w, int64_t ldw, const T* x, const int64_t* off, int64_t kc, T* out, int64_t ldo,
                       bool first) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  V acc[kTileChannels][MVn];
  for (int r = 0; r < kTileChannels; ++r)
    for (int j = 0; j < MVn; ++j) acc[r][j] = first ? V{} : *reinterpret_cast<const U*>(out + r * ldo + j * L);
  for (int64_t k = 0; k < kc; ++k) {
    const T* xk = x + off[k];
    V xv[MVn];
    for (int j = 0; j < MVn; ++j) xv[j] = *reinterpret_cast<const U*>(xk + j * L);
    for (int r = 0; r < kTileChannels; ++r) {
      const T wr = w[r * ldw + k];
      for (int j = 0; j < MVn; ++j) acc[r][j] += wr * xv[j];
    }
  }
  for (int r = 0; r < kTileChannels; ++r)
    for (int j = 0; j < MVn; ++j) *reinterpret_cast<U*>(out + r * ldo + j * L) = acc[r][j];
}

// (d, h, w) strides of a (B, C, *spatial) tensor, size-1 dims filled in with 0
void spatial_strides(const at::Tensor& t, int64_t* s) {
  const int rank = t.dim() - 2;
  s[0] = s[1] = s[2] = 0;
  for (int i = 0; i < rank; ++i) s[3 - rank + i] = t.stride(2 + i);
}

// The shape of a dense stride-1 convolution: input channels M (Geometry::channels), output channels N
struct ClGeometry : Geometry {
  int64_t out_channels, experts;
  int64_t padded[3];
  int64_t plane() const { return padded[0] * padded[1] * padded[2]; }
  int64_t positions() const { return out[0] * out[1] * out[2]; }
  int64_t rows() const { return taps() * channels; }  // kernel rows per output channel: r = channel * taps + tap
  int64_t blocks(int64_t nb) const { return (out_channels + nb - 1) / nb; }
  // element offsets into a padded channels-innermost sample: of each output position's window, of each kernel row
  std::vector<int64_t> position_offsets() const {
    std::vector<int64_t> off(positions());
    int64_t p = 0;
    for (int64_t d = 0; d < out[0]; ++d)
      for (int64_t h = 0; h < out[1]; ++h)
        for (int64_t w = 0; w < out[2]; ++w) off[p++] = ((d * padded[1] + h) * padded[2] + w) * channels;
    return off;
  }
  // (rows r = tap * channels + channel with `taps_first`: the order of channels_last experts)
  std::vector<int64_t> row_offsets(bool taps_first = false) const {
    std::vector<int64_t> off(rows());
    for (int64_t kd = 0; kd < kernel[0]; ++kd)
      for (int64_t kh = 0; kh < kernel[1]; ++kh)
        for (int64_t kw = 0; kw < kernel[2]; ++kw) {
          const int64_t tap = (kd * kernel[1] + kh) * kernel[2] + kw;
          const int64_t base =
              ((kd * dilation[0] * padded[1] + kh * dilation[1]) * padded[2] + kw * dilation[2]) * channels;
          for (int64_t c = 0; c < channels; ++c) off[taps_first ? tap * channels + c : c * taps() + tap] = base + c;
        }
    return off;
  }
};

ClGeometry cl_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t out_channels, int64_t experts) {
  const int64_t rank = x.dim() - 2;
  ClGeometry g;
  static_cast<Geometry&>(g) = geometry(x, kernel, std::vector<int64_t>(rank, 1), padding, dilation);
  for (int64_t i = 0; i < rank; ++i)
    TORCH_CHECK(padding[i] >= 0 && dilation[i] >= 1, "dyconv dense kernel: bad padding ", padding, " or dilation ",
                dilation);
  g.out_channels = out_channels;
  g.experts = experts;
  for (int i = 0; i < 3; ++i) g.padded[i] = g.in[i] + 2 * g.padding[i];
  return g;
}

// ... for the loop over padded planes: positions numbered on the padded grid
struct DenseGeometry : ClGeometry {
  bool taps_first;  // the experts' kernel element order: (tap, channel) for channels_last experts
  // positions computed per sample: up to the last output position's index in the padded volume
  int64_t grid_positions() const { return ((out[0] - 1) * padded[1] + out[1] - 1) * padded[2] + out[2]; }
};

template <typename T>
void dense_run(const DenseGeometry& g, const at::Tensor& x, const T* experts, const T* attention, const T* bias,
               const at::Tensor& y) {
  constexpr int L = Vec<T>::lanes;
  const int64_t vectors = (g.grid_positions() + L - 1) / L, padded_positions = vectors * L;
  const int64_t plane = g.plane(), sample = g.channels * plane, row = g.rows();
  const int64_t max_offset =
      ((g.kernel[0] - 1) * g.dilation[0] * g.padded[1] + (g.kernel[1] - 1) * g.dilation[1]) * g.padded[2] +
      (g.kernel[2] - 1) * g.dilation[2];
  // the padded input, with slack after the last plane for the dropped positions' reads
  auto padded = at::empty({g.batch * sample + padded_positions + max_offset}, x.options());
  T* xp = padded.template data_ptr<T>();
  const T* xs = x.template data_ptr<T>();
  const auto xst = x.strides();
  int64_t in_stride[3];  // x's strides as (d, h, w)
  spatial_strides(x, in_stride);
  at::parallel_for(0, g.batch * g.channels, 8, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.channels, c = bc % g.channels;
      T* dst = xp + bc * plane;
      std::fill(dst, dst + plane, T(0));
      const T* src = xs + b * xst[0] + c * xst[1];
      for (int64_t d = 0; d < g.in[0]; ++d)
        for (int64_t h = 0; h < g.in[1]; ++h) {
          T* drow = dst + ((d + g.padding[0]) * g.padded[1] + h + g.padding[1]) * g.padded[2] + g.padding[2];
          const T* srow = src + d * in_stride[0] + h * in_stride[1];
          if (in_stride[2] == 1) {
            std::memcpy(drow, srow, g.in[2] * sizeof(T));
          } else {
            for (int64_t w = 0; w < g.in[2]; ++w) drow[w] = srow[w * in_stride[2]];
          }
        }
    }
  });
  std::fill(xp + g.batch * sample, xp + padded.numel(), T(0));
  std::vector<int64_t> offsets(row);
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t kd = 0; kd < g.kernel[0]; ++kd)
      for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
        for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
          const int64_t tap = (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
          const int64_t k = g.taps_first ? tap * g.channels + c : c * g.taps() + tap;
          offsets[k] = c * plane + (kd * g.dilation[0] * g.padded[1] + kh * g.dilation[1]) * g.padded[2] +
                       kw * g.dilation[2];
        }
  T* ys = y.template data_ptr<T>();
  const auto yst = y.strides();
  int64_t out_stride[3];
  spatial_strides(y, out_stride);
  const int64_t E = g.experts, Co = g.out_channels;
  const int64_t width = std::max<int64_t>(L, kMixedBytes / kTileChannels / int64_t(sizeof(T)) / L * L);
  const int64_t KC = std::min(width, row);
  const int64_t blocks = (Co + kTileChannels - 1) / kTileChannels;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mixed(kTileChannels * KC);
    std::vector<const T*> rows(E);
    // at batch > 1 the step's expert rows, copied once for the batch as (K, NR, KC) so that each sample's mixing is
    // one pass (the rows past the block's last output channel zeros)
    const bool pack = g.batch > 1;
    std::vector<T> packed(pack ? E * kTileChannels * KC : 0);
    std::vector<const T*> packed_rows(E);
    for (int64_t e = 0; e < E; ++e) packed_rows[e] = packed.data() + e * kTileChannels * KC;
    // every sample's partial sums for the block: the loop over samples is inside the loop over kernel elements, so
    // that a buffer's worth of the block's experts is read from L2 once for the whole batch and stays in L1
    std::vector<T> acc(g.batch * kTileChannels * padded_positions);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t oc0 = blk * kTileChannels, nr = std::min<int64_t>(kTileChannels, Co - oc0);
      for (int64_t k0 = 0; k0 < row; k0 += KC) {
        const int64_t kc = std::min(KC, row - k0);
        const int64_t* off = offsets.data() + k0;
        const bool first = k0 == 0;
        if (pack) {
          for (int64_t e = 0; e < E; ++e)
            for (int64_t r = 0; r < kTileChannels; ++r) {
              T* dst = packed.data() + (e * kTileChannels + r) * KC;
              if (r >= nr) {
                std::fill(dst, dst + KC, T(0));
                continue;
              }
              std::memcpy(dst, experts + (e * Co + oc0 + r) * row + k0, kc * sizeof(T));
            }
        }
        for (int64_t b = 0; b < g.batch; ++b) {
          const T* a = attention + b * E;
          if (pack) {
            mix_row<T>(mixed.data(), packed_rows.data(), a, E, kTileChannels * KC);
          } else {
            for (int64_t r = 0; r < kTileChannels; ++r) {
              T* m = mixed.data() + r * KC;
              if (r >= nr) {  // past the last output channel: zeros, the results dropped
                std::fill(m, m + kc, T(0));
                continue;
              }
              for (int64_t e = 0; e < E; ++e) rows[e] = experts + (e * Co + oc0 + r) * row + k0;
              mix_row<T>(m, rows.data(), a, E, kc);
            }
          }
          const T* xb = xp + b * sample;
          T* out = acc.data() + b * kTileChannels * padded_positions;
          int64_t v = 0;
          for (; v + kTileVectors <= vectors; v += kTileVectors)
            dense_tile<T, kTileVectors>(mixed.data(), KC, xb + v * L, off, kc, out + v * L, padded_positions, first);
          switch (vectors - v) {
            case 3:
              dense_tile<T, 3>(mixed.data(), KC, xb + v * L, off, kc, out + v * L, padded_positions, first);
              break;
            case 2:
              dense_tile<T, 2>(mixed.data(), KC, xb + v * L, off, kc, out + v * L, padded_positions, first);
              break;
            case 1:
              dense_tile<T, 1>(mixed.data(), KC, xb + v * L, off, kc, out + v * L, padded_positions, first);
              break;
            default:
              break;
          }
        }
      }
      for (int64_t b = 0; b < g.batch; ++b) {
        const T* a = attention + b * E;
        for (int64_t r = 0; r < nr; ++r) {
          T shift = 0;
          if (bias != nullptr)
            for (int64_t e = 0; e < E; ++e) shift += a[e] * bias[e * Co + oc0 + r];
          const T* src = acc.data() + (b * kTileChannels + r) * padded_positions;
          T* dst = ys + b * yst[0] + (oc0 + r) * yst[1];
          for (int64_t d = 0; d < g.out[0]; ++d)
            for (int64_t h = 0; h < g.out[1]; ++h) {
              const T* srow = src + (d * g.padded[1] + h) * g.padded[2];
              T* drow = dst + d * out_stride[0] + h * out_stride[1];
              for (int64_t w = 0; w < g.out[2]; ++w) drow[w * out_stride[2]] = srow[w] + shift;
            }
        }
      }
    }
  });
}

// ---- Channels-innermost dense convolution: dense_forward's second loop, and the gradients ----
//
// dense_run above computes output positions in vectors (a 7×7 output pays for the padded grid's 64) and mixes each
// sample's kernel rows in the experts' own (output channel, kernel element) order. Here the vectors run over output
// channels instead: a register tile is kClPositions output positions (any of them: no padded grid) by kClVectors
// vectors of NB output channels, and the experts are read as rows of NB output channels (ExpertRows), r = channel *
// taps + tap, or tap * channels + channel for channels_last forward experts, packed 128 rows at a time into a
// buffer that stays in cache, so that mixing a sample's rows is one flat weighted sum of K contiguous runs.
// The packing is a transposition that the batch shares, so this loop pays from a few samples on (channels_loop_pays
// below). The input is copied once, zero-padded, to channels-innermost planes. This loop (cl_run) is dense_forward's
// "channels" loop and gives the input gradient, the experts read transposed with flipped taps (the input gradient of
// a stride-1 convolution is a convolution of the output gradient). A second loop (cl_weight_grad) gives the expert
// and attention gradients without writing any per-sample kernel gradient to memory.

constexpr int kClPositions = 7;  // output positions per register tile of cl_run (7², 14², 28², 56²: whole tiles)
constexpr int kClRows = 6;       // kernel rows per register tile of the weight gradient
constexpr int64_t kClMixedBytes = 32768;  // cl_run's buffer of mixed rows (KC x NB elements)
constexpr int kClVectors = 4;   // vectors of output channels per register tile; a block is kClVectors * lanes
constexpr int64_t kClGradRows = 96;       // kernel rows of a block per task of the weight gradient

template <typename T>
constexpr int64_t cl_block() {
  return kClVectors * Vec<T>::lanes;
}

// How many of block blk's kClVectors vectors hold some of the N channels (fewer only in a partial last block)
template <typename T>
inline int block_vectors(int64_t N, int64_t blk) {
  constexpr int64_t NB = cl_block<T>(), L = Vec<T>::lanes;
  return static_cast<int>((std::min(NB, N - blk * NB) + L - 1) / L);
}

// x copied zero-padded to (B, plane * C) channels-innermost memory; x itself where it lies so already (unpadded
// channels_last input: 1x1 layers)
template <typename T>
at::Tensor cl_padded(const at::Tensor& x, const ClGeometry& g) {
  if (g.padding[0] == 0 && g.padding[1] == 0 && g.padding[2] == 0 && channels_innermost(x)) return x;
  const int64_t C = g.channels, plane = g.plane();
  auto out = at::zeros({g.batch, plane * C}, x.options());
  T* dst = out.template data_ptr<T>();
  const T* src = x.template data_ptr<T>();
  int64_t s[3];
  spatial_strides(x, s);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  at::parallel_for(0, g.batch * g.in[0] * g.in[1], 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (g.in[0] * g.in[1]), d = (r / g.in[1]) % g.in[0], h = r % g.in[1];
      T* drow = dst + b * plane * C +
                (((d + g.padding[0]) * g.padded[1] + h + g.padding[1]) * g.padded[2] + g.padding[2]) * C;
      const T* srow = src + b * sb + d * s[0] + h * s[1];
      for (int64_t w = 0; w < g.in[2]; ++w) {
        const T* sp = srow + w * s[2];
        T* dp = drow + w * C;
        if (sc == 1) {
          std::memcpy(dp, sp, C * sizeof(T));
        } else {
          for (int64_t c = 0; c < C; ++c) dp[c] = sp[c * sc];
        }
      }
    }
  });
  return out;
}

// The experts (K, C_out, C_in, *kernel), any strides, read the way the channels-innermost loops use them: for a
// block of NB of the N channels, kernel rows r = m * taps + t of NB values each (zeros past the last channel), or,
// with `memory_order` for forward experts stored tap-major (channels_last), r = t * M + m (taps_first), so that each
// channel's rows lie in order in memory either way. Forward: N = C_out, M = C_in. Transposed (the input gradient's
// kernel): N = C_in, M = C_out, taps flipped. Rows are packed a step at a time (cl_run: 128 rows; the weight
// gradient: 96), just before use, into buffers that stay in cache.
template <typename T>
struct ExpertRows {
  const T* src;
  int64_t K, N, M, taps, sk, sn, sm;
  std::vector<int64_t> tap_offset;  // element offset of each tap (flipped when transposed)
  bool rows_in_order;                // row r of every channel at element r (contiguous forward experts)
  bool taps_first = false;           // rows r = t * M + m

  ExpertRows(const at::Tensor& experts, bool transpose, bool memory_order = false)
      : src(experts.template data_ptr<T>()) {
    const int64_t rank = experts.dim() - 3, Co = experts.size(1), Ci = experts.size(2);
    int64_t ks[3] = {1, 1, 1}, st[3] = {0, 0, 0};
    for (int i = 0; i < rank; ++i) {
      ks[3 - rank + i] = experts.size(3 + i);
      st[3 - rank + i] = experts.stride(3 + i);
    }
    K = experts.size(0);
    taps = ks[0] * ks[1] * ks[2];
    N = transpose ? Ci : Co;
    M = transpose ? Co : Ci;
    sk = experts.stride(0);
    sn = experts.stride(transpose ? 2 : 1);
    sm = experts.stride(transpose ? 1 : 2);
    tap_offset.resize(taps);
    for (int64_t kd = 0; kd < ks[0]; ++kd)
      for (int64_t kh = 0; kh < ks[1]; ++kh)
        for (int64_t kw = 0; kw < ks[2]; ++kw) {
          const int64_t t = (kd * ks[1] + kh) * ks[2] + kw;
          tap_offset[t] = transpose ? (ks[0] - 1 - kd) * st[0] + (ks[1] - 1 - kh) * st[1] + (ks[2] - 1 - kw) * st[2]
                                    : kd * st[0] + kh * st[1] + kw * st[2];
        }
    rows_in_order = sm == taps;
    for (int64_t t = 0; t < taps; ++t) rows_in_order = rows_in_order && tap_offset[t] == t;
    if (memory_order && !transpose && !rows_in_order && sm == 1) {
      taps_first = true;
      for (int64_t t = 0; t < taps; ++t) taps_first = taps_first && tap_offset[t] == t * M;
      rows_in_order = taps_first;
    }
  }
  int64_t rows() const { return M * taps; }

  // rows [r0, r0 + count) of expert k for block blk into out[count][NB]. Where each channel's rows lie in order in
  // memory (contiguous forward experts) a channel at a time, reading in order; otherwise a row at a time, reading
  // the channels at a fixed stride (small for the transposed experts). (Gathering a row of contiguous forward
  // experts touches one page per channel for wide layers: 3x3 512->512 at batch 32 took 3.1x static with it.)
  void pack(int64_t blk, int64_t k, int64_t r0, int64_t count, T* out) const {
    constexpr int64_t NB = cl_block<T>();
    const int64_t n0 = blk * NB, nn = std::min(NB, N - n0);
    const T* base = src + k * sk + n0 * sn;
    if (rows_in_order) {
      for (int64_t n = 0; n < nn; ++n) {
        const T* s = base + n * sn + r0;
        for (int64_t i = 0; i < count; ++i) out[i * NB + n] = s[i];
      }
      for (int64_t i = 0; i < count; ++i)
        for (int64_t n = nn; n < NB; ++n) out[i * NB + n] = T(0);
      return;
    }
    int64_t m = r0 / taps, t = r0 % taps;
    for (int64_t i = 0; i < count; ++i) {
      const T* s = base + m * sm + tap_offset[t];
      T* row = out + i * NB;
      for (int64_t n = 0; n < nn; ++n) row[n] = s[n * sn];
      for (int64_t n = nn; n < NB; ++n) row[n] = T(0);
      if (++t == taps) {
        t = 0;
        ++m;
      }
    }
  }
};

// out[r][:] = (first ? 0 : out[r][:]) + sum_k m[k][:] * x[r][off[k]], r < MR: MR positions by the first NV
// vectors of one block of NB (all kClVectors but in a block's last, partial block)
template <typename T, int MR, int NV>
inline void cl_tile(const T* m, const T* const* x, const int64_t* off, int64_t kc, T* out, bool first) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t NB = cl_block<T>();
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = first ? V{} : *reinterpret_cast<const U*>(out + r * NB + j * L);
  for (int64_t k = 0; k < kc; ++k) {
    V w[NV];
    for (int j = 0; j < NV; ++j) w[j] = *reinterpret_cast<const U*>(m + k * NB + j * L);
    const int64_t o = off[k];
    for (int r = 0; r < MR; ++r) {
      const T s = x[r][o];
      for (int j = 0; j < NV; ++j) acc[r][j] += s * w[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) *reinterpret_cast<U*>(out + r * NB + j * L) = acc[r][j];
}

// out = (first ? 0 : out) + the P positions' products, in register tiles of at most kClPositions positions, as even as
// the count allows (16 positions: 6 + 5 + 5 rather than 7 + 7 + 2, whose last tile would load the block's kernel rows
// for only two positions)
template <typename T, int NV>
inline void cl_tiles(const T* m, const T* xb, const int64_t* pos, int64_t P, const int64_t* off, int64_t kc, T* out,
                     bool first) {
  constexpr int64_t NB = cl_block<T>();
  const T* rows[kClPositions];
  const int64_t tiles = (P + kClPositions - 1) / kClPositions, larger = P % std::max<int64_t>(tiles, 1);
  int64_t p = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t n = P / tiles + (i < larger ? 1 : 0);
    for (int r = 0; r < n; ++r) rows[r] = xb + pos[p + r];
    static_assert(kClPositions == 7, "the cases below cover every tile size");
    switch (n) {
      case 7: cl_tile<T, 7, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 6: cl_tile<T, 6, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 5: cl_tile<T, 5, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 4: cl_tile<T, 4, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 3: cl_tile<T, 3, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 2: cl_tile<T, 2, NV>(m, rows, off, kc, out + p * NB, first); break;
      case 1: cl_tile<T, 1, NV>(m, rows, off, kc, out + p * NB, first); break;
      default: break;
    }
    p += n;
  }
}

// cl_tiles for the vectors of the block that hold channels: nv of them (1 to kClVectors)
template <typename T>
inline void cl_tiles(int nv, const T* m, const T* xb, const int64_t* pos, int64_t P, const int64_t* off, int64_t kc,
                     T* out, bool first) {
  static_assert(kClVectors == 4, "the cases below cover every count of vectors");
  switch (nv) {
    case 4: cl_tiles<T, 4>(m, xb, pos, P, off, kc, out, first); break;
    case 3: cl_tiles<T, 3>(m, xb, pos, P, off, kc, out, first); break;
    case 2: cl_tiles<T, 2>(m, xb, pos, P, off, kc, out, first); break;
    default: cl_tiles<T, 1>(m, xb, pos, P, off, kc, out, first); break;
  }
}

// How many groups of samples cl_run splits the batch into, each block of output channels a task per group: enough
// that every thread gets a task, and more where the tasks would not divide evenly among the threads (3 blocks on 2
// threads: 6 tasks rather than 3, of which one thread would take two), as long as the threads' shares differ by at
// most an eighth. Each group packs the experts once more, about what mixing one more sample costs.
inline int64_t sample_groups(int64_t batch, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::min<int64_t>(batch, (threads + blocks - 1) / blocks);
  auto uneven = [&](int64_t n) {
    const int64_t tasks = blocks * n, most = (tasks + threads - 1) / threads;
    return 8 * (most * threads - tasks) > tasks;
  };
  while (groups < batch && uneven(groups)) ++groups;
  return groups;
}

// y = the dynamic convolution of the padded input xp (cl_padded) with the experts and attention (B, K); bias (K, N)
// or null. y: (B, N, *out), any strides.
template <typename T>
void cl_run(const ClGeometry& g, const T* xp, const ExpertRows<T>& experts, const T* attention, const T* bias,
            const at::Tensor& y) {
  constexpr int64_t NB = cl_block<T>();
  const int64_t R = g.rows(), P = g.positions(), E = g.experts, N = g.out_channels, blocks = g.blocks(NB);
  const int64_t sample = g.plane() * g.channels;
  const auto pos = g.position_offsets();
  const auto off = g.row_offsets(experts.taps_first);
  const int64_t KC = std::max<int64_t>(1, std::min<int64_t>(R, kClMixedBytes / (NB * int64_t(sizeof(T)))));
  // blocks of output channels, and groups of samples too where the blocks alone would leave threads idle
  const int64_t groups = sample_groups(g.batch, blocks);
  T* ys = y.template data_ptr<T>();
  int64_t ysp[3];
  spatial_strides(y, ysp);
  std::vector<int64_t> ypos(P);
  {
    int64_t p = 0;
    for (int64_t d = 0; d < g.out[0]; ++d)
      for (int64_t h = 0; h < g.out[1]; ++h)
        for (int64_t w = 0; w < g.out[2]; ++w) ypos[p++] = d * ysp[0] + h * ysp[1] + w * ysp[2];
  }
  const int64_t yb = y.stride(0), yc = y.stride(1);
  at::parallel_for(0, blocks * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mixed(KC * NB), chunk(E * KC * NB);
    std::vector<const T*> rows(E);
    std::vector<T> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / groups, grp = task % groups;
      const int64_t b0 = g.batch * grp / groups, b1 = g.batch * (grp + 1) / groups;
      const int nv = block_vectors<T>(N, blk);
      acc.resize((b1 - b0) * P * NB);
      for (int64_t k0 = 0; k0 < R; k0 += KC) {
        const int64_t kc = std::min(KC, R - k0);
        for (int64_t e = 0; e < E; ++e) {
          experts.pack(blk, e, k0, kc, chunk.data() + e * KC * NB);
          rows[e] = chunk.data() + e * KC * NB;
        }
        for (int64_t b = b0; b < b1; ++b) {
          mix_row<T>(mixed.data(), rows.data(), attention + b * E, E, kc * NB);
          cl_tiles<T>(nv, mixed.data(), xp + b * sample, pos.data(), P, off.data() + k0, kc,
                      acc.data() + (b - b0) * P * NB, k0 == 0);
        }
      }
      const int64_t n0 = blk * NB, nn = std::min(NB, N - n0);
      for (int64_t b = b0; b < b1; ++b) {
        T shift[NB];
        for (int64_t n = 0; n < nn; ++n) {
          shift[n] = 0;
          if (bias != nullptr)
            for (int64_t e = 0; e < E; ++e) shift[n] += attention[b * E + e] * bias[e * N + n0 + n];
        }
        const T* src = acc.data() + (b - b0) * P * NB;
        T* dst = ys + b * yb + n0 * yc;
        for (int64_t p = 0; p < P; ++p)
          for (int64_t n = 0; n < nn; ++n) dst[n * yc + ypos[p]] = src[p * NB + n] + shift[n];
      }
    }
  });
}

// One task of cl_weight_grad (kernel rows [r0, r1) of block blk) over every sample, for the first NV vectors of the
// block (all kClVectors but in a partial last block): the dW tiles folded into the task's expert gradients (grows, its
// rows from r0) and the attention's gradient parts (ga: (B, E) of this task)
template <typename T, int NV>
void grad_task(const ClGeometry& g, const T* xp, const T* gys, int64_t blk, int64_t r0, int64_t r1, const int64_t* pos,
               const int64_t* off, const T* attention, const T* wrows, T* grows, typename Vec<T>::type* dots, T* ga) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::unaligned U;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t NB = cl_block<T>();
  const int64_t P = g.positions(), E = g.experts, blocks = g.blocks(NB), sample = g.plane() * g.channels;
  // sample by sample: its output gradient for the block and its input rows stay in cache for all the task's rows
  for (int64_t b = 0; b < g.batch; ++b) {
    const T* xb = xp + b * sample;
    const T* gb = gys + (b * blocks + blk) * P * NB;
    const T* a = attention + b * E;
    std::fill(dots, dots + E, V{});
    for (int64_t r = r0; r < r1; r += kClRows) {
      const int64_t rr = std::min<int64_t>(kClRows, r1 - r);
      int64_t o[kClRows];
      for (int i = 0; i < kClRows; ++i) o[i] = off[r + std::min<int64_t>(i, rr - 1)];
      V acc[kClRows][NV];
      for (int i = 0; i < kClRows; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = V{};
      for (int64_t p = 0; p < P; ++p) {
        V w[NV];
        for (int j = 0; j < NV; ++j) w[j] = *reinterpret_cast<const U*>(gb + p * NB + j * L);
        const T* xr = xb + pos[p];
        for (int i = 0; i < kClRows; ++i) {
          const T s = xr[o[i]];
          for (int j = 0; j < NV; ++j) acc[i][j] += s * w[j];
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        const T ae = a[e];
        T* ge = grows + (e * kClGradRows + r - r0) * NB;
        const T* we = wrows + (e * kClGradRows + r - r0) * NB;
        V dot = dots[e];
        for (int64_t i = 0; i < rr; ++i)
          for (int j = 0; j < NV; ++j) {
            U* gv = reinterpret_cast<U*>(ge + i * NB + j * L);
            *gv += ae * acc[i][j];
            dot += acc[i][j] * *reinterpret_cast<const U*>(we + i * NB + j * L);
          }
        dots[e] = dot;
      }
    }
    for (int64_t e = 0; e < E; ++e) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += dots[e][l];
      ga[b * E + e] = sum;
    }
  }
}

// The expert and attention gradients of cl_run's convolution (bias excluded), never writing a per-sample kernel
// gradient to memory: for each sample, block of output channels and kClRows kernel rows, the tile
// dW_b[rows][NB] = sum_p x_b[p + off(row)] * dy_b[p][NB] is computed in registers and at once folded into the K
// experts' gradients (sum_b a[b, k] dW_b) and the attention's (<dW_b, W_k>).
// Each task (a block of output channels, kClGradRows kernel rows) packs its rows of the experts and accumulates their
// gradients in buffers of its own, written out once at its end. gy: output gradient (B, N, *out), any strides.
// Returns (the experts' gradients (K, C_out, C_in, *kernel) contiguous, the attention's (B, K)).
template <typename T>
std::tuple<at::Tensor, at::Tensor> cl_weight_grad(const ClGeometry& g, const T* xp, const at::Tensor& gy,
                                                  const ExpertRows<T>& experts, const T* attention,
                                                  at::IntArrayRef sizes) {
  typedef typename Vec<T>::type V;
  constexpr int64_t NB = cl_block<T>();
  const int64_t R = g.rows(), P = g.positions(), E = g.experts, N = g.out_channels, blocks = g.blocks(NB);
  const auto pos = g.position_offsets();
  const auto off = g.row_offsets();
  // the output gradient as (B, blocks, P, NB), zeros past the last channel
  auto gyc = at::zeros({g.batch, blocks, P, NB}, gy.options());
  {
    T* dst = gyc.template data_ptr<T>();
    const T* src = gy.template data_ptr<T>();
    int64_t s[3];
    spatial_strides(gy, s);
    const int64_t sb = gy.stride(0), sc = gy.stride(1);
    at::parallel_for(0, g.batch * P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bp = begin; bp < end; ++bp) {
        const int64_t b = bp / P, p = bp % P;
        const int64_t d = p / (g.out[1] * g.out[2]), h = (p / g.out[2]) % g.out[1], w = p % g.out[2];
        const T* sp = src + b * sb + d * s[0] + h * s[1] + w * s[2];
        T* dp = dst + (b * blocks * P + p) * NB;
        for (int64_t n = 0; n < N; ++n) dp[(n / NB) * P * NB + n % NB] = sp[n * sc];
      }
    });
  }
  const T* gys = gyc.template data_ptr<T>();
  auto grad = dyconv_cpu::reused_empty(sizes, gy.options());  // large: reused memory (reused_memory.cpp)
  T* gd = grad.template data_ptr<T>();
  const int64_t chunks = (R + kClGradRows - 1) / kClGradRows, tasks = blocks * chunks;
  auto parts = at::zeros({tasks, g.batch, E}, gy.options());
  T* ga = parts.template data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> dots(E);  // the sample's <dW_b, W_k> per expert, summed across lanes at the sample's end
    std::vector<T> wrows(E * kClGradRows * NB), grows(E * kClGradRows * NB);  // the task's rows: experts, gradients
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / chunks, r0 = (task % chunks) * kClGradRows, r1 = std::min(R, r0 + kClGradRows);
      const int nv = block_vectors<T>(N, blk);
      std::fill(grows.begin(), grows.end(), T(0));
      for (int64_t e = 0; e < E; ++e) experts.pack(blk, e, r0, r1 - r0, wrows.data() + e * kClGradRows * NB);
      const int64_t *po = pos.data(), *of = off.data();
      const T* w = wrows.data();
      T *gr = grows.data(), *gat = ga + task * g.batch * E;
      V* d = dots.data();
      switch (nv) {
        case 4: grad_task<T, 4>(g, xp, gys, blk, r0, r1, po, of, attention, w, gr, d, gat); break;
        case 3: grad_task<T, 3>(g, xp, gys, blk, r0, r1, po, of, attention, w, gr, d, gat); break;
        case 2: grad_task<T, 2>(g, xp, gys, blk, r0, r1, po, of, attention, w, gr, d, gat); break;
        default: grad_task<T, 1>(g, xp, gys, blk, r0, r1, po, of, attention, w, gr, d, gat);
      }
      const int64_t n0 = blk * NB, nn = std::min(NB, N - n0);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t n = 0; n < nn; ++n) {
          T* dst = gd + (e * N + n0 + n) * R + r0;  // (K, C_out, C_in * taps): rows are channel * taps + tap
          const T* src = grows.data() + e * kClGradRows * NB + n;
          for (int64_t i = 0; i < r1 - r0; ++i) dst[i] = src[i * NB];
        }
    }
  });
  return {grad, parts.sum(0)};
}

// Whether the experts (K, C_out, C_in, *kernel) lie channels_last: (K, C_out, *kernel, C_in) in memory.
bool experts_taps_first(const at::Tensor& e) {
  if (e.stride(2) != 1) return false;
  int64_t expected = e.size(2);
  for (int64_t dim = e.dim() - 1; dim >= 3; --dim) {
    if (e.size(dim) != 1 && e.stride(dim) != expected) return false;
    expected *= e.size(dim);
  }
  return (e.size(1) == 1 || e.stride(1) == expected) && (e.size(0) == 1 || e.stride(0) == expected * e.size(1));
}

// The checks every dense op makes; returns the experts in x's dtype
at::Tensor dense_checks(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& attention) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "dyconv dense kernel: x must be a float32 or float64 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(experts.dim() == x.dim() + 1 && experts.size(2) == x.size(1),
              "dyconv dense kernel: experts must be (K, C_out, C_in, *kernel) with C_in = ", x.size(1), ", got ",
              experts.sizes());
  TORCH_CHECK(attention.dim() == 2 && attention.size(0) == x.size(0) && attention.size(1) == experts.size(0),
              "dyconv dense kernel: attention must be (", x.size(0), ", ", experts.size(0), "), got ",
              attention.sizes());
  return experts.to(x.scalar_type());
}

std::vector<int64_t> out_sizes(const Geometry& g, int64_t channels, int64_t rank) {
  std::vector<int64_t> sizes{g.batch, channels};
  for (int i = 3 - static_cast<int>(rank); i < 3; ++i) sizes.push_back(g.out[i]);
  return sizes;
}

// Whether dense_forward's "auto" takes cl_run (vectors over output channels: no padded positions, but the experts'
// rows packed for each block and step, a cost the batch shares) rather than dense_run (vectors over positions of the
// padded grid). Measured with benchmarks/dense_loops.py (README, the "dense_kernel" item): cl_run is the faster from
// batch 8 on, and from batch 2 on where the experts are channels_last.
bool channels_loop_pays(const DenseGeometry& g) { return g.batch >= 8 || (g.batch >= 2 && g.taps_first); }

// x (B, C_in, *spatial), any layout; experts (K, C_out, C_in, *kernel); attention (B, K); bias (K, C_out) or none.
// `loop`: "grid" (dense_run), "channels" (cl_run) or "auto" (channels_loop_pays).
// Returns y (B, C_out, *out) in x's suggested memory format.
at::Tensor dense_forward(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& attention,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef padding, at::IntArrayRef dilation,
                         c10::string_view loop) {
  TORCH_CHECK(loop == "auto" || loop == "grid" || loop == "channels",
              "dyconv dense kernel: loop must be 'auto', 'grid' or 'channels', got '", loop, "'");
  auto e = dense_checks(x, experts, attention);
  const int64_t rank = x.dim() - 2, K = e.size(0);
  DenseGeometry g;
  static_cast<ClGeometry&>(g) = cl_geometry(x, e.sizes().slice(3), padding, dilation, e.size(1), K);
  g.taps_first = !e.is_contiguous() && experts_taps_first(e);
  if (!g.taps_first) e = e.contiguous();
  auto a = attention.to(x.scalar_type()).contiguous();
  at::Tensor bb;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == g.out_channels,
                "dyconv dense kernel: bias must be (", K, ", ", g.out_channels, "), got ", bias->sizes());
    bb = bias->to(x.scalar_type()).contiguous();
  }
  auto y = at::empty(out_sizes(g, g.out_channels, rank), x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  const bool channels = loop == "channels" || (loop == "auto" && channels_loop_pays(g));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_dense_forward", [&] {
    const scalar_t* bp = bb.defined() ? bb.data_ptr<scalar_t>() : nullptr;
    if (channels) {
      auto xp = cl_padded<scalar_t>(x, g);
      cl_run<scalar_t>(g, xp.data_ptr<scalar_t>(), ExpertRows<scalar_t>(e, false, true), a.data_ptr<scalar_t>(), bp,
                       y);
    } else {
      dense_run<scalar_t>(g, x, e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), bp, y);
    }
  });
  return y;
}

// Gradients of dense_forward without its bias (the caller adds the bias's part): the input's (the output gradient
// convolved with the transposed, flipped experts; needs padding <= dilation * (kernel - 1)), the experts' and the
// attention's. Undefined tensors for what is not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& experts, const at::Tensor& attention,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              bool need_input, bool need_experts) {
  auto e = dense_checks(x, experts, attention);
  const int64_t rank = x.dim() - 2, K = e.size(0);
  auto g = cl_geometry(x, e.sizes().slice(3), padding, dilation, e.size(1), K);
  auto gy = grad_y.to(x.scalar_type());
  TORCH_CHECK(gy.sizes() == at::IntArrayRef(out_sizes(g, g.out_channels, rank)),
              "dyconv dense kernel: grad_y must be ", at::IntArrayRef(out_sizes(g, g.out_channels, rank)), ", got ",
              grad_y.sizes());
  auto a = attention.to(x.scalar_type()).contiguous();
  at::Tensor grad_x, grad_e, grad_a;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dyconv_dense_backward", [&] {
    if (need_input) {
      std::vector<int64_t> pad_t(rank);
      for (int64_t i = 0; i < rank; ++i) {
        pad_t[i] = dilation[i] * (e.size(3 + i) - 1) - padding[i];
        TORCH_CHECK(pad_t[i] >= 0, "dyconv dense kernel: the input gradient needs padding <= dilation * (kernel - "
                    "1), got padding ", padding, ", dilation ", dilation, ", kernel ", e.sizes().slice(3));
      }
      auto gt = cl_geometry(gy, e.sizes().slice(3), pad_t, dilation, e.size(2), K);
      grad_x = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
      auto gp = cl_padded<scalar_t>(gy, gt);
      cl_run<scalar_t>(gt, gp.data_ptr<scalar_t>(), ExpertRows<scalar_t>(e, true), a.data_ptr<scalar_t>(), nullptr,
                       grad_x);
    }
    if (need_experts) {
      auto xp = cl_padded<scalar_t>(x, g);
      auto grads = cl_weight_grad<scalar_t>(g, xp.data_ptr<scalar_t>(), gy, ExpertRows<scalar_t>(e, false),
                                            a.data_ptr<scalar_t>(), e.sizes());
      grad_e = std::get<0>(grads);
      grad_a = std::get<1>(grads);
    }
  });
  return {grad_x, grad_e, grad_a};
}

}  // namespace

TORCH_LIBRARY(dyconv_cpu, m) {
  m.def("depthwise_forward(Tensor x, Tensor experts, Tensor attention, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation) -> (Tensor, Tensor)");
  m.def("depthwise_backward(Tensor grad_y, Tensor x, Tensor mixed, int[] kernel, int[] stride, int[] padding, "
        "int[] dilation, bool need_input, bool need_mixed) -> (Tensor, Tensor)");
  m.def("one_sample_mix(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float scale, Tensor experts, "
        "Tensor(a!) out, Tensor? bias) -> Tensor");
  m.def("one_sample_attention(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float scale) -> Tensor");
  m.def("one_sample_depthwise(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float scale, Tensor experts, "
        "Tensor? bias, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("mix_rows(Tensor attention, Tensor experts, Tensor(a!) out) -> ()");
  m.def("depthwise_inference(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float scale, Tensor experts, "
        "Tensor? bias, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("dense_forward(Tensor x, Tensor experts, Tensor attention, Tensor? bias, int[] padding, int[] dilation, "
        "str loop=\"auto\") -> Tensor");
  m.def("dense_backward(Tensor grad_y, Tensor x, Tensor experts, Tensor attention, int[] padding, int[] dilation, "
        "bool need_input, bool need_experts) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dyconv_cpu, CPU, m) {
  m.impl("depthwise_forward", depthwise_forward);
  m.impl("depthwise_backward", depthwise_backward);
  m.impl("one_sample_mix", one_sample_mix);
  m.impl("one_sample_attention", one_sample_attention);
  m.impl("one_sample_depthwise", one_sample_depthwise);
  m.impl("depthwise_inference", depthwise_inference);
  m.impl("mix_rows", mix_rows);
  m.impl("dense_forward", dense_forward);
  m.impl("dense_backward", dense_backward);
}
