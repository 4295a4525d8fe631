// oneDNN convolution kernels for jbp: three XLA FFI handlers (forward, input gradient, weight
// gradient) of a float32 NHWC/HWIO conv2d with stride, explicit padding, dilation and groups.
// Built on first use by jbp/_conv_kernels/onednn.py (g++ against jax.ffi.include_dir() and the
// onednn-cpu-gomp wheel); see docs/onednn.md.
//
// Equations (EQUATIONS.md, "Convolution"), stride s, dilation d, padded input a:
//   forward      z[n,h,w,k]     = sum_{i,j,c} a[n, h*s+i*d, w*s+j*d, c] W[i,j,c,k]
//   input grad   dL/da          = the transpose of the forward in a, applied to delta
//   weight grad  dL/dW[i,j,c,k] = sum_{n,h,w} delta[n,h,w,k] a[n, h*s+i*d, w*s+j*d, c]
// (c runs over the input channels of k's group.)
//
// Threads: oneDNN here runs on OpenMP (libgomp). XLA:CPU runs independent thunks concurrently,
// and each calling thread would start its own OpenMP team: two concurrent convolutions would put
// 2 x cores threads on the cores. One mutex serialises the oneDNN executions (each already uses
// every core). OMP_WAIT_POLICY=PASSIVE (set by the Python side before libgomp loads) keeps the
// idle team from spinning on XLA's cores.
//
// Memory: each call takes its scratchpad (and the reordered weights) from a buffer owned by the
// calling thread, so two calls never share one; the buffer grows to the largest need and stays.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;
using dims = dnnl::memory::dims;

namespace {

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// Everything that determines one primitive. Shapes: x (n,h,w,c), kernel (kh,kw,c/groups,k),
// output (n,oh,ow,k).
struct Key {
  int64_t kind, n, h, w, c, kh, kw, k, oh, ow, sh, sw, dh, dw, pt, pb, pl, pr, groups;
  auto tie() const {
    return std::tie(kind, n, h, w, c, kh, kw, k, oh, ow, sh, sw, dh, dw, pt, pb, pl, pr, groups);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

struct Prim {
  dnnl::primitive prim;
  dnnl::memory::desc x_user, w_user, y_user;  // the caller's NHWC / HWIO buffers
  dnnl::memory::desc w_prim;                   // the primitive's (maybe blocked) weights
  dnnl::memory::desc scratch;
  bool reorder = false;                        // w_prim != w_user
  dnnl::reorder w_reorder;                     // user->prim (fwd, input grad), prim->user (wgrad)
  size_t w_prim_bytes = 0, scratch_bytes = 0;
};

// HWIO kernel as oneDNN sees it: (OC, IC, KH, KW) or, grouped, (G, OC/G, IC/G, KH, KW), with the
// strides of the row-major HWIO buffer w[i][j][c][g*OCg + o].
dnnl::memory::desc hwio_desc(const Key& k) {
  const int64_t g = k.groups, icg = k.c / g, ocg = k.k / g;
  if (g == 1)
    return dnnl::memory::desc({k.k, k.c, k.kh, k.kw}, dt::f32,
                              dims{1, k.k, k.kw * k.c * k.k, k.c * k.k});
  return dnnl::memory::desc({g, ocg, icg, k.kh, k.kw}, dt::f32,
                            dims{ocg, 1, g * ocg, k.kw * icg * g * ocg, icg * g * ocg});
}

dnnl::memory::desc any_weights(const Key& k) {
  const int64_t g = k.groups;
  if (g == 1) return dnnl::memory::desc({k.k, k.c, k.kh, k.kw}, dt::f32, dnnl::memory::format_tag::any);
  return dnnl::memory::desc({g, k.k / g, k.c / g, k.kh, k.kw}, dt::f32, dnnl::memory::format_tag::any);
}

std::unique_ptr<Prim> make(const Key& k) {
  auto p = std::make_unique<Prim>();
  using tag = dnnl::memory::format_tag;
  p->x_user = dnnl::memory::desc({k.n, k.c, k.h, k.w}, dt::f32, tag::nhwc);
  p->y_user = dnnl::memory::desc({k.n, k.k, k.oh, k.ow}, dt::f32, tag::nhwc);
  p->w_user = hwio_desc(k);
  const dims strides{k.sh, k.sw}, dil{k.dh - 1, k.dw - 1}, pad_l{k.pt, k.pl}, pad_r{k.pb, k.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto fwd = dnnl::convolution_forward::primitive_desc(
      engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      p->x_user, any_weights(k), p->y_user, strides, dil, pad_l, pad_r, attr);
  if (k.kind == kForward) {
    p->prim = dnnl::convolution_forward(fwd);
    p->w_prim = fwd.weights_desc();
    p->scratch = fwd.scratchpad_desc();
  } else if (k.kind == kInputGrad) {
    auto bd = dnnl::convolution_backward_data::primitive_desc(
        engine(), dnnl::algorithm::convolution_direct, p->x_user, any_weights(k), p->y_user,
        strides, dil, pad_l, pad_r, fwd, attr);
    p->prim = dnnl::convolution_backward_data(bd);
    p->w_prim = bd.weights_desc();
    p->scratch = bd.scratchpad_desc();
  } else {
    auto bw = dnnl::convolution_backward_weights::primitive_desc(
        engine(), dnnl::algorithm::convolution_direct, p->x_user, any_weights(k), p->y_user,
        strides, dil, pad_l, pad_r, fwd, attr);
    p->prim = dnnl::convolution_backward_weights(bw);
    p->w_prim = bw.diff_weights_desc();
    p->scratch = bw.scratchpad_desc();
  }
  p->reorder = p->w_prim != p->w_user;
  if (p->reorder) {
    p->w_reorder = k.kind == kWeightGrad
        ? dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p->w_prim, engine(), p->w_user))
        : dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p->w_user, engine(), p->w_prim));
    p->w_prim_bytes = p->w_prim.get_size();
  }
  p->scratch_bytes = p->scratch.get_size();
  return p;
}

std::mutex cache_mu;   // guards `cache`
std::mutex exec_mu;    // one oneDNN execution (one OpenMP team) at a time
std::map<Key, std::unique_ptr<Prim>> cache;

// JBP_ONEDNN_NO_LOCK=1 lets executions overlap: only for measuring what the lock buys
// (scripts/bench_onednn.py --threads).
bool serialise() {
  static const bool on = std::getenv("JBP_ONEDNN_NO_LOCK") == nullptr;
  return on;
}

Prim* lookup(const Key& k) {
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = cache.find(k);
  if (it != cache.end()) return it->second.get();
  Prim* raw = cache.emplace(k, make(k)).first->second.get();
  return raw;
}

std::atomic<int64_t> scratch_total{0};  // bytes held by all threads' scratch buffers

// The calling thread's scratch buffer (64-byte aligned, grown on demand).
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(ptr); scratch_total -= static_cast<int64_t>(bytes); }
  void* get(size_t need) {
    if (need > bytes) {
      std::free(ptr);
      scratch_total -= static_cast<int64_t>(bytes);
      ptr = nullptr;
      bytes = 0;
      size_t rounded = (need + 63) / 64 * 64;
      if (posix_memalign(&ptr, 64, rounded) != 0) return nullptr;
      bytes = rounded;
      scratch_total += static_cast<int64_t>(bytes);
    }
    return ptr;
  }
};
thread_local Scratch scratch;

Key make_key(int64_t kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
             ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
             int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  return Key{kind, x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
             sh, sw, dh, dw, pt, pb, pl, pr, groups};
}

// Operands by kind: forward (x, w) -> y; input grad (dy, w) -> dx; weight grad (x, dy) -> dw.
template <int64_t KIND>
ffi::Error Run(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
               int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int64_t groups) {
  ffi::Span<const int64_t> xd, wd, yd;
  if (KIND == kForward) { xd = a.dimensions(); wd = b.dimensions(); yd = out->dimensions(); }
  if (KIND == kInputGrad) { yd = a.dimensions(); wd = b.dimensions(); xd = out->dimensions(); }
  if (KIND == kWeightGrad) { xd = a.dimensions(); yd = b.dimensions(); wd = out->dimensions(); }
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("jbp oneDNN conv: rank-4 NHWC/HWIO operands expected");
  // The operands must agree with each other and the attributes (oneDNN would read past them).
  auto out_size = [](int64_t in, int64_t k, int64_t s, int64_t d, int64_t lo, int64_t hi) {
    return (in + lo + hi - (k - 1) * d - 1) / s + 1;
  };
  if (groups < 1 || xd[3] != wd[2] * groups || wd[3] % groups != 0 || yd[3] != wd[3] ||
      xd[0] != yd[0] || yd[1] != out_size(xd[1], wd[0], sh, dh, pt, pb) ||
      yd[2] != out_size(xd[2], wd[1], sw, dw, pl, pr))
    return ffi::Error::InvalidArgument("jbp oneDNN conv: operand shapes do not match");
  const Key key = make_key(KIND, xd, wd, yd, sh, sw, dh, dw, pt, pb, pl, pr, groups);
  try {
    Prim* p = lookup(key);
    std::unique_lock<std::mutex> lock(exec_mu, std::defer_lock);
    if (serialise()) lock.lock();
    char* buf = static_cast<char*>(scratch.get(p->scratch_bytes + p->w_prim_bytes + 64));
    if (buf == nullptr) return ffi::Error::Internal("jbp oneDNN conv: out of memory (scratch)");
    dnnl::engine& e = engine();
    dnnl::stream s(e);
    dnnl::memory pad(p->scratch, e, buf);
    dnnl::memory w_prim = p->reorder
        ? dnnl::memory(p->w_prim, e, buf + (p->scratch_bytes + 63) / 64 * 64)
        : dnnl::memory();
    void* A = a.untyped_data();
    void* B = b.untyped_data();
    void* O = out->untyped_data();
    if (KIND == kForward) {
      dnnl::memory x(p->x_user, e, A), w(p->w_user, e, B), y(p->y_user, e, O);
      if (p->reorder) { p->w_reorder.execute(s, w, w_prim); w = w_prim; }
      p->prim.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y},
                          {DNNL_ARG_SCRATCHPAD, pad}});
    } else if (KIND == kInputGrad) {
      dnnl::memory dy(p->y_user, e, A), w(p->w_user, e, B), dx(p->x_user, e, O);
      if (p->reorder) { p->w_reorder.execute(s, w, w_prim); w = w_prim; }
      p->prim.execute(s, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w},
                          {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      dnnl::memory x(p->x_user, e, A), dy(p->y_user, e, B), dw_user(p->w_user, e, O);
      dnnl::memory dwm = p->reorder ? w_prim : dw_user;
      p->prim.execute(s, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy},
                          {DNNL_ARG_DIFF_WEIGHTS, dwm}, {DNNL_ARG_SCRATCHPAD, pad}});
      if (p->reorder) p->w_reorder.execute(s, w_prim, dw_user);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jbp oneDNN conv: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("jbp oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define JBP_BIND                                                                          \
  ffi::Ffi::Bind()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Ret<ffi::Buffer<ffi::F32>>()                                                       \
      .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("dh").Attr<int64_t>("dw")    \
      .Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>("pr")    \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbpDnnlConvForward, Run<kForward>, JBP_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbpDnnlConvInputGrad, Run<kInputGrad>, JBP_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbpDnnlConvWeightGrad, Run<kWeightGrad>, JBP_BIND);

// Whether oneDNN builds a primitive for this case (and caches it), called at trace time by the
// Python predicate so that a case oneDNN rejects falls back to XLA instead of failing at run time.
// p: kind, n, h, w, c, kh, kw, k, oh, ow, sh, sw, dh, dw, pt, pb, pl, pr, groups. Returns 1 if
// supported; otherwise 0 and the reason in msg.
extern "C" int JbpDnnlConvSupported(const int64_t* p, char* msg, int64_t msg_len) {
  Key k{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12],
        p[13], p[14], p[15], p[16], p[17], p[18]};
  try {
    lookup(k);
    return 1;
  } catch (const std::exception& err) {
    if (msg != nullptr && msg_len > 0) {
      std::strncpy(msg, err.what(), static_cast<size_t>(msg_len - 1));
      msg[msg_len - 1] = '\0';
    }
    return 0;
  }
}

// Bytes of scratch (oneDNN scratchpads and reordered weights) held now by all threads: memory
// outside XLA's buffers, which compiled.memory_analysis() does not count.
extern "C" int64_t JbpDnnlScratchBytes() { return scratch_total.load(); }
