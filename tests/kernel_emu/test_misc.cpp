// linear.cu (fp16 GEMV: M = 1..10, K % 8 != 0, tiny K, misaligned weights), norm.cu (rms_norm,
// add_rms_norm, in place, odd widths), rope.cu (NeoX halves, odd strides, head_dim 32/80/128) and
// elementwise.cu (silu_mul, add, casts, embedding, gather, add_bias, write_kv) against references.
#include "emu.h"
#include "../../kernels/linear.cu"
#include "../../kernels/norm.cu"
#include "../../kernels/rope.cu"
#include "../../kernels/elementwise.cu"
#include <random>
static std::mt19937 rng(2);
float urand() { return std::uniform_real_distribution<float>(-1, 1)(rng); }
int fails = 0;
void check(const char* what, double got, double want, double tol) {
    if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (fails < 20) printf("FAIL %s got %.7g want %.7g\n", what, got, want); ++fails; }
}
char buf[256];
void lin(int M, int K, int N, bool with_bias, int col0, bool misalign_w) {
    std::vector<__half> wb(N * K + 8); __half* w = wb.data() + (misalign_w ? 1 : 0);
    for (int i = 0; i < N * K; ++i) w[i] = __float2half_rn(urand());
    std::vector<float> x(M * K); for (auto& v : x) v = urand();
    std::vector<float> bias(N); for (auto& b : bias) b = urand();
    int stride = col0 + N + 1;
    std::vector<float> out(M * stride, 777.f);
    emu_launch(dim3((N + LINEAR_ROWS_PER_BLOCK - 1) / LINEAR_ROWS_PER_BLOCK), dim3(LINEAR_THREADS), [&] {
        linear_f16_f32(x.data(), M, K, w, with_bias ? bias.data() : nullptr, out.data(), stride, col0, N); });
    for (int n = 0; n < N; ++n) for (int m = 0; m < M; ++m) {
        double acc = with_bias ? bias[n] : 0, mag = 0;
        for (int k = 0; k < K; ++k) { double p = (double)x[m * K + k] * h2f(w[n * K + k]); acc += p; mag += std::fabs(p); }
        snprintf(buf, 256, "linear M=%d K=%d N=%d m=%d n=%d", M, K, N, m, n);
        check(buf, out[m * stride + col0 + n], acc, 1e-5 * (mag + 1));
    }
    for (int m = 0; m < M; ++m) for (int c = 0; c < stride; ++c) if ((c < col0 || c >= col0 + N) && out[m * stride + c] != 777.f) { printf("FAIL linear wrote outside\n"); ++fails; }
}
void norms(int rows, int cols) {
    std::vector<float> x(rows * cols), w(cols), res(rows * cols), out(rows * cols), res2;
    for (auto& v : x) v = urand() * 3; for (auto& v : w) v = urand(); for (auto& v : res) v = urand();
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { rms_norm_f32(x.data(), w.data(), out.data(), cols, 1e-6f); });
    for (int r = 0; r < rows; ++r) {
        double ss = 0; for (int c = 0; c < cols; ++c) ss += (double)x[r * cols + c] * x[r * cols + c];
        double sc = 1 / std::sqrt(ss / cols + 1e-6);
        for (int c = 0; c < cols; ++c) { snprintf(buf, 256, "rms cols=%d r=%d c=%d", cols, r, c); check(buf, out[r * cols + c], x[r * cols + c] * sc * w[c], 1e-5); }
    }
    res2 = res;
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { add_rms_norm_f32(res2.data(), x.data(), w.data(), out.data(), cols, 1e-5f); });
    for (int r = 0; r < rows; ++r) {
        double ss = 0; for (int c = 0; c < cols; ++c) { float v = res[r * cols + c] + x[r * cols + c]; check("addnorm residual", res2[r * cols + c], v, 0); ss += (double)v * v; }
        double sc = 1 / std::sqrt(ss / cols + 1e-5);
        for (int c = 0; c < cols; ++c) check("addnorm out", out[r * cols + c], res2[r * cols + c] * sc * w[c], 1e-5);
    }
    // in place
    std::vector<float> xi = x;
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { rms_norm_f32(xi.data(), w.data(), xi.data(), cols, 1e-6f); });
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { rms_norm_f32(x.data(), w.data(), out.data(), cols, 1e-6f); });
    for (int i = 0; i < rows * cols; ++i) check("rms in place", xi[i], out[i], 0);
}
// ps = positions per row (1, or 3 for M-RoPE with sections ending at e0, e1).
void rope(int rows, int stride, int nh, int hd, int ps = 1, int e0 = -1, int e1 = 0) {
    if (e0 < 0) e0 = hd / 2;
    std::vector<float> x(rows * stride); for (auto& v : x) v = urand();
    std::vector<uint32_t> pos(rows * ps); for (auto& p : pos) p = rng() % 40000;
    std::vector<float> inv(hd / 2); for (int i = 0; i < hd / 2; ++i) inv[i] = std::pow(10000.f, -2.f * i / hd);
    auto y = x;
    emu_launch(dim3(rows, nh), dim3(hd / 2), [&] { rope_f32(y.data(), rows, stride, nh, hd, pos.data(), ps, e0, e1, inv.data()); });
    for (int r = 0; r < rows; ++r) for (int c = 0; c < stride; ++c) {
        int h = c / hd, i = c % hd; float want = x[r * stride + c];
        if (h < nh) {
            int ii = i % (hd / 2);
            int comp = ps == 1 ? 0 : (ii < e0 ? 0 : (ii < e1 ? 1 : 2));
            float ang = (float)pos[r * ps + comp] * inv[ii]; double s = std::sin((double)ang), co = std::cos((double)ang);
            float a = x[r * stride + h * hd + ii], b = x[r * stride + h * hd + ii + hd / 2];
            want = i < hd / 2 ? a * co - b * s : a * s + b * co;
        }
        snprintf(buf, 256, "rope hd=%d r=%d c=%d", hd, r, c); check(buf, y[r * stride + c], want, 1e-5);
    }
}
void elem() {
    int rows = 3, h = 37;
    std::vector<float> gu(rows * 2 * h), o(rows * h); for (auto& v : gu) v = urand() * 8;
    emu_launch(dim3(2), dim3(ELEMWISE_THREADS), [&] { silu_mul_f32(gu.data(), o.data(), rows, h); });
    for (int r = 0; r < rows; ++r) for (int j = 0; j < h; ++j) { float g = gu[r * 2 * h + j]; check("silu", o[r * h + j], g / (1 + std::exp(-g)) * gu[r * 2 * h + h + j], 1e-6); }
    std::vector<float> a(1000), b(1000); for (auto& v : a) v = urand(); for (auto& v : b) v = urand(); auto a0 = a;
    emu_launch(dim3(1), dim3(ELEMWISE_THREADS), [&] { add_f32(a.data(), b.data(), 999); });
    for (int i = 0; i < 1000; ++i) check("add", a[i], i < 999 ? a0[i] + b[i] : a0[i], 0);
    std::vector<__half> hh(1000); std::vector<float> back(1000);
    emu_launch(dim3(3), dim3(ELEMWISE_THREADS), [&] { cast_f32_f16(a.data(), hh.data(), 1000); });
    emu_launch(dim3(3), dim3(ELEMWISE_THREADS), [&] { cast_f16_f32(hh.data(), back.data(), 1000); });
    for (int i = 0; i < 1000; ++i) check("cast", back[i], h2f(f2h(a[i])), 0);
    for (int cols : {16, 20}) {
        int vocab = 50, n = 4;
        std::vector<__half> tab(vocab * cols); for (auto& v : tab) v = __float2half_rn(urand());
        std::vector<uint32_t> ids = {3, 49, 0, 3}; std::vector<float> e(n * cols);
        emu_launch(dim3(n), dim3(ELEMWISE_THREADS), [&] { embedding_f16(tab.data(), ids.data(), e.data(), n, cols); });
        for (int i = 0; i < n; ++i) for (int c = 0; c < cols; ++c) check("embedding", e[i * cols + c], h2f(tab[ids[i] * cols + c]), 0);
        std::vector<float> src(vocab * cols); for (auto& v : src) v = urand(); std::vector<float> g(n * cols);
        emu_launch(dim3(n), dim3(ELEMWISE_THREADS), [&] { gather_rows_f32(src.data(), ids.data(), g.data(), n, cols); });
        for (int i = 0; i < n; ++i) for (int c = 0; c < cols; ++c) check("gather", g[i * cols + c], src[ids[i] * cols + c], 0);
    }
    { int R = 3, N = 5, st = 9, c0 = 2; std::vector<float> o(R * st), bias(N); for (auto& v : o) v = urand(); for (auto& v : bias) v = urand(); auto o0 = o;
      emu_launch(dim3(1), dim3(ELEMWISE_THREADS), [&] { add_bias_f32(o.data(), st, c0, bias.data(), R, N); });
      for (int r = 0; r < R; ++r) for (int c = 0; c < st; ++c) check("bias", o[r * st + c], (c >= c0 && c < c0 + N) ? o0[r * st + c] + bias[c - c0] : o0[r * st + c], 0); }
    { int R = 3, qs = 40, ko = 16, vo = 28, kvc = 12, slots_n = 10; std::vector<float> q(R * qs); for (auto& v : q) v = urand();
      std::vector<uint32_t> sl = {7, 2, 9}; std::vector<__half> kc(slots_n * kvc, __ushort_as_half(0x7e00)), vc(slots_n * kvc, __ushort_as_half(0x7e00));
      emu_launch(dim3(R), dim3(ELEMWISE_THREADS), [&] { write_kv_f16(q.data(), qs, ko, vo, kvc, sl.data(), kc.data(), vc.data(), R); });
      for (int r = 0; r < R; ++r) for (int c = 0; c < kvc; ++c) { check("kv k", h2f(kc[sl[r] * kvc + c]), h2f(f2h(q[r * qs + ko + c])), 0); check("kv v", h2f(vc[sl[r] * kvc + c]), h2f(f2h(q[r * qs + vo + c])), 0); }
      int untouched = 0; for (int s = 0; s < slots_n; ++s) if (s != 7 && s != 2 && s != 9) for (int c = 0; c < kvc; ++c) untouched += kc[s * kvc + c].x == 0x7e00;
      if (untouched != 7 * kvc) { printf("FAIL kv wrote other slots\n"); ++fails; } }
}
// layer_norm_f32 against a double-precision LayerNorm (with a large offset: the centred second
// pass must not lose the variance), in place too.
void layer_norm(int rows, int cols, float offset) {
    std::vector<float> x(rows * cols), w(cols), b(cols), out(rows * cols);
    for (auto& v : x) v = urand() * 3 + offset; for (auto& v : w) v = urand(); for (auto& v : b) v = urand();
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { layer_norm_f32(x.data(), w.data(), b.data(), out.data(), cols, 1e-6f); });
    for (int r = 0; r < rows; ++r) {
        double m = 0, v = 0; for (int c = 0; c < cols; ++c) m += x[r * cols + c]; m /= cols;
        for (int c = 0; c < cols; ++c) v += (x[r * cols + c] - m) * (x[r * cols + c] - m); v /= cols;
        for (int c = 0; c < cols; ++c) { snprintf(buf, 256, "layer_norm cols=%d r=%d c=%d", cols, r, c);
            check(buf, out[r * cols + c], (x[r * cols + c] - m) / std::sqrt(v + 1e-6) * w[c] + b[c], 2e-5); }
    }
    std::vector<float> xi = x;
    emu_launch(dim3(rows), dim3(NORM_THREADS), [&] { layer_norm_f32(xi.data(), w.data(), b.data(), xi.data(), cols, 1e-6f); });
    for (int i = 0; i < rows * cols; ++i) check("layer_norm in place", xi[i], out[i], 0);
}
void gelu() {
    std::vector<float> x(1001); for (auto& v : x) v = urand() * 6;
    for (int kind : {0, 1}) {
        auto y = x;
        emu_launch(dim3(2), dim3(ELEMWISE_THREADS), [&] { gelu_f32(y.data(), 1000, kind); });
        for (int i = 0; i < 1001; ++i) {
            double v = x[i], want = i == 1000 ? v : kind == 0 ? v / (1 + std::exp(-1.702 * v)) : 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
            snprintf(buf, 256, "gelu kind=%d i=%d", kind, i); check(buf, y[i], want, 1e-6);
        }
    }
}
int main() {
    for (int M : {1, 2, 3, 4, 5, 7, 8, 10}) lin(M, 64, 35, M % 2, M % 3, false);
    lin(1, 3584 / 4, 16, true, 0, false);
    lin(2, 100, 21, true, 1, false);  // K%8 != 0
    lin(3, 13, 9, false, 0, false);   // tiny K
    lin(1, 64, 17, true, 0, true);    // misaligned w -> slow
    lin(8, 72, 3, true, 0, true);
    norms(3, 1000); norms(2, 1001); norms(1, 4100); norms(1, 3);
    rope(3, 70, 2, 32); rope(2, 300, 3, 80); rope(1, 128, 1, 128);
    rope(3, 140, 4, 32, 3, 4, 10); rope(2, 256, 2, 128, 3, 16, 40);  // M-RoPE: Qwen2-VL's 16/24/24
    elem();
    layer_norm(3, 1280, 0); layer_norm(2, 32, 100); layer_norm(1, 3, -2);
    gelu();
    printf(fails ? "misc: %d FAILURES\n" : "misc: all ok\n", fails);
    return fails != 0;
}
