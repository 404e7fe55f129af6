// attention.cu: split-K decode + reduce (D = 64/128, GQA, ctx 0/1/odd, one or many splits, empty
// splits' partials, output stride) and tiled prefill (prefixes, ragged tiles; D = 16/64/80/128)
// over shuffled paged-KV slots, and the prefill kernel as the vision tower's bidirectional
// attention within spans, against a double-precision softmax(QK^T/sqrt(D))V.
#include "emu.h"
#include "../../kernels/attention.cu"
#include <random>
static std::mt19937 rng(3);
float urand() { return std::uniform_real_distribution<float>(-1, 1)(rng); }
int fails = 0;
void check(const char* what, double got, double want, double tol) {
    if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (fails < 20) printf("FAIL %s got %.7g want %.7g\n", what, got, want); ++fails; }
}
char buf[256];
struct Setup {
    int D, nh, nkv, kv_cols, qkv_stride, rows, total_slots = 2000;
    std::vector<float> qkv; std::vector<__half> kc, vc; std::vector<uint32_t> slots, off, ctx;
};
// reference output for row r, head h
std::vector<double> ref(const Setup& s, int r, int h) {
    int D = s.D, kvh = h / (s.nh / s.nkv); int n = s.ctx[r];
    std::vector<double> sc(n), o(D, 0.0);
    if (!n) return o;
    double mx = -1e300;
    for (int p = 0; p < n; ++p) { uint32_t sl = s.slots[s.off[r] + p]; double d = 0;
        for (int i = 0; i < D; ++i) d += (double)s.qkv[r * s.qkv_stride + h * D + i] * h2f(s.kc[(size_t)sl * s.kv_cols + kvh * D + i]);
        sc[p] = d / std::sqrt((double)D); mx = std::max(mx, sc[p]); }
    double sum = 0; for (auto& v : sc) { v = std::exp(v - mx); sum += v; }
    for (int p = 0; p < n; ++p) { uint32_t sl = s.slots[s.off[r] + p]; for (int i = 0; i < D; ++i) o[i] += sc[p] / sum * h2f(s.vc[(size_t)sl * s.kv_cols + kvh * D + i]); }
    return o;
}
Setup make(int D, int nh, int nkv, std::vector<uint32_t> ctx, std::vector<uint32_t> off, int nslots_list) {
    Setup s; s.D = D; s.nh = nh; s.nkv = nkv; s.kv_cols = nkv * D; s.qkv_stride = (nh + 2 * nkv) * D + 3; s.rows = ctx.size();
    s.qkv.resize(s.rows * s.qkv_stride); for (auto& v : s.qkv) v = urand() * 2;
    s.kc.resize(s.total_slots * s.kv_cols); s.vc.resize(s.kc.size());
    for (auto& v : s.kc) v = __float2half_rn(urand() * 2); for (auto& v : s.vc) v = __float2half_rn(urand());
    std::vector<uint32_t> perm(s.total_slots); for (int i = 0; i < s.total_slots; ++i) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
    s.slots.assign(perm.begin(), perm.begin() + nslots_list); s.ctx = ctx; s.off = off; return s;
}
void decode(int D, std::vector<uint32_t> ctx, int split_len) {
    int nh = 4, nkv = 2, R = ctx.size();
    std::vector<uint32_t> off(R); int tot = 0; for (int r = 0; r < R; ++r) { off[r] = tot; tot += ctx[r]; }
    Setup s = make(D, nh, nkv, ctx, off, std::max(tot, 1));
    uint32_t mc = *std::max_element(ctx.begin(), ctx.end()); int ns = std::max(1u, (mc + split_len - 1) / split_len);
    std::vector<float> po(R * nh * ns * D, NAN), pml(R * nh * ns * 2, NAN);
    int ostride = nh * D + 5; std::vector<float> out(R * ostride, 555.f);
    auto dk = D == 64 ? attention_decode_d64_f16 : attention_decode_d128_f16;
    auto rk = D == 64 ? attention_reduce_d64_f32 : attention_reduce_d128_f32;
    float scale = 1 / std::sqrt((float)D);
    emu_launch(dim3(R, nh, ns), dim3(ATTN_DECODE_THREADS), [&] { dk(s.qkv.data(), s.qkv_stride, s.kc.data(), s.vc.data(), s.kv_cols, s.slots.data(), s.off.data(), s.ctx.data(), nh, nkv, scale, split_len, po.data(), pml.data(), ns); });
    emu_launch(dim3(R, nh), dim3(D), [&] { rk(po.data(), pml.data(), ns, nh, out.data(), ostride); });
    for (int r = 0; r < R; ++r) for (int h = 0; h < nh; ++h) {
        auto o = ref(s, r, h);
        for (int d = 0; d < D; ++d) { snprintf(buf, 256, "decode D=%d split=%d r=%d(ctx %u) h=%d d=%d", D, split_len, r, ctx[r], h, d); check(buf, out[r * ostride + h * D + d], o[d], 2e-5); }
        for (int sp = 0; sp < ns; ++sp) { size_t idx = ((size_t)r * nh + h) * ns + sp; bool empty = (uint32_t)(sp * split_len) >= ctx[r];
            if (empty && !(pml[idx * 2] == -INFINITY && pml[idx * 2 + 1] == 0 && po[idx * D] == 0)) { printf("FAIL empty split r=%d sp=%d: %g %g %g\n", r, sp, pml[idx*2], pml[idx*2+1], po[idx*D]); ++fails; } }
    }
    for (int r = 0; r < R; ++r) for (int c = nh * D; c < ostride; ++c) if (out[r * ostride + c] != 555.f) { printf("FAIL decode wrote outside\n"); ++fails; }
}
decltype(&attention_prefill_d64_f16) prefill_kernel(int D) {
    switch (D) { case 16: return attention_prefill_d16_f16; case 64: return attention_prefill_d64_f16;
                 case 80: return attention_prefill_d80_f16; default: return attention_prefill_d128_f16; }
}
// Bidirectional spans (the vision tower): every row of a span sees the whole span, tiles are cut
// within spans, and the slot list is the rows themselves (as the CUDA backend's attention_spans
// lays it out after writing K/V row r to slot r).
void spans(int D, std::vector<int> lens) {
    int nh = 3, nkv = 3, rows = 0; for (int l : lens) rows += l;
    std::vector<uint32_t> ctx, off, t0, tr; int at = 0;
    for (int l : lens) {
        for (int i = 0; i < l; ++i) { ctx.push_back(l); off.push_back(at); }
        for (int i = 0; i < l; i += PREFILL_TILE_ROWS) { t0.push_back(at + i); tr.push_back(std::min(PREFILL_TILE_ROWS, l - i)); }
        at += l;
    }
    Setup s = make(D, nh, nkv, ctx, off, rows);
    for (int i = 0; i < rows; ++i) s.slots[i] = i;
    int ostride = nh * D; std::vector<float> out(rows * ostride, 555.f);
    auto pk = prefill_kernel(D);
    emu_launch(dim3(t0.size(), nh), dim3(ATTN_PREFILL_THREADS), [&] { pk(s.qkv.data(), s.qkv_stride, s.kc.data(), s.vc.data(), s.kv_cols, s.slots.data(), s.off.data(), s.ctx.data(), t0.data(), tr.data(), nh, nkv, 1 / std::sqrt((float)D), out.data(), ostride); });
    for (int r = 0; r < rows; ++r) for (int h = 0; h < nh; ++h) {
        auto o = ref(s, r, h);
        for (int d = 0; d < D; ++d) { snprintf(buf, 256, "spans D=%d r=%d h=%d d=%d", D, r, h, d); check(buf, out[r * ostride + h * D + d], o[d], 2e-5); }
    }
}
// prefill: sequences given as (prefix, new_rows); rows of all sequences concatenated
void prefill(int D, std::vector<std::pair<int,int>> seqs) {
    int nh = 6, nkv = 2;
    std::vector<uint32_t> ctx, off, t0, tr; int tot = 0, row = 0;
    for (auto [pre, n] : seqs) {
        for (int i = 0; i < n; ++i) { ctx.push_back(pre + i + 1); off.push_back(tot); }
        for (int i = 0; i < n; i += PREFILL_TILE_ROWS) { t0.push_back(row + i); tr.push_back(std::min(PREFILL_TILE_ROWS, n - i)); }
        row += n; tot += pre + n;
    }
    Setup s = make(D, nh, nkv, ctx, off, tot);
    int ostride = nh * D; std::vector<float> out(ctx.size() * ostride, 555.f);
    auto pk = prefill_kernel(D);
    emu_launch(dim3(t0.size(), nh), dim3(ATTN_PREFILL_THREADS), [&] { pk(s.qkv.data(), s.qkv_stride, s.kc.data(), s.vc.data(), s.kv_cols, s.slots.data(), s.off.data(), s.ctx.data(), t0.data(), tr.data(), nh, nkv, 1 / std::sqrt((float)D), out.data(), ostride); });
    for (size_t r = 0; r < ctx.size(); ++r) for (int h = 0; h < nh; ++h) {
        auto o = ref(s, r, h);
        for (int d = 0; d < D; ++d) { snprintf(buf, 256, "prefill D=%d r=%zu(ctx %u) h=%d d=%d", D, r, ctx[r], h, d); check(buf, out[r * ostride + h * D + d], o[d], 2e-5); }
    }
}
int main() {
    for (int D : {64, 128}) {
        decode(D, {1, 37, 300, 0}, 64);
        decode(D, {5, 17}, 1000);   // one split
        decode(D, {33, 100}, 7);    // many small splits, odd length
        decode(D, {129}, 16);
        prefill(D, {{0, 5}, {10, 45}, {0, 33}, {70, 1}});
    }
    for (int D : {16, 80}) prefill(D, {{0, 5}, {10, 45}, {70, 1}});
    for (int D : {16, 80}) spans(D, {24, 4, 70});
    printf(fails ? "attn: %d FAILURES\n" : "attn: all ok\n", fails);
    return fails != 0;
}
