/* The teacher target's vocabulary-wide work for one chunk of positions, fused, on the CPU
   (targets.TeacherRows.chunk; design.md §1). Built and loaded by lssd_cpu_kernel.py.

   For each row r of a chunk (one supervised position), with z the teacher's logits [V], y the label,
   m the first index of z's maximum, t = softmax(z), log p the student's log-softmax [V], and q the
   objective's target:

       lssd (0)  q = t with t[y] and t[m] exchanged (the logit swap permutes the row)
       kl   (1)  q = t
       mft  (2)  q = (1 - lam) t + lam onehot(y), lam as losses.mft_mixin

       grad[r]   -= q_scale * q                    (grad holds the student's p on entry)
       kl[r]      = KL(q || p) = sum q log q - sum q log p
       kl_base[r] = KL(t || p) = sum t log t - sum t log p,  sum t log t = sum t (z - m) - log sum exp(z - m)
       top1[r]    = m

   KL(q || p) follows from the row's sums in closed form: lssd's q is a permutation of t (the same
   sum q log q; sum q log p moves by (t_m - t_y)(log p_m - log p_y)); mft's q log q is
   (1 - lam)(sum t log t - t_y log t_y) + (1 - t_y) xlogx(1 - lam) + xlogx(q_y), and its
   sum q log p = (1 - lam) sum t log p + lam log p_y.

   Eager PyTorch makes max, softmax, the swap, two dot products and the update separate passes over
   a [chunk, V] tensor that has long left the cache; here each row (32 KB at V = 8k) comes from
   memory once and stays in L1/L2 for its four passes. Sums are taken in double: at V = 128k a float
   accumulator per SIMD lane would add 8k terms. */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's libmvec has a vector expf; math.h declares it only under -ffast-math, whose finite-math
   assumption would let a NaN logit vanish in the max, and the trainer must see it to stop. */
float expf(float) __attribute__((simd("notinbranch")));
#endif

enum { LSSD = 0, KL = 1, MFT = 2 };

static inline double xlogx(double x) { return x > 0 ? x * log(x) : 0; }

void teacher_target(const float *z, const float *log_p, float *grad, const int64_t *labels,
                    int64_t rows, int64_t v, int objective, float q_scale, float threshold,
                    float *scratch, double *kl, double *kl_base, int64_t *top1, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * v, *lp = log_p + r * v;
        float *g = grad + r * v, *e = scratch + (int64_t)omp_get_thread_num() * v;  /* e [V] per thread */

        float m = zr[0];
        #pragma omp simd reduction(max:m)
        for (int64_t j = 0; j < v; j++) m = zr[j] > m ? zr[j] : m;
        int64_t mi = 0;  /* the first index holding m: find the 64-wide block, then scan it */
        for (int64_t b = 0; b < v; b += 64) {
            int64_t end = b + 64 < v ? b + 64 : v;
            int hit = 0;
            #pragma omp simd reduction(|:hit)
            for (int64_t j = b; j < end; j++) hit |= zr[j] == m;
            if (hit) {
                for (mi = b; zr[mi] != m; mi++);
                break;
            }
        }

        double se = 0, sez = 0;  /* sum exp(z - m), sum exp(z - m) (z - m) */
        #pragma omp simd reduction(+:se, sez)
        for (int64_t j = 0; j < v; j++) {
            float d = zr[j] - m, x = expf(d);
            se += x;
            sez += x * d;
            e[j] = x;
        }
        int64_t y = labels[r];
        double t_y = e[y] / se, t_m = e[mi] / se, rest = (se - e[y]) / se;  /* rest = 1 - t_y */
        double lam = 0;
        if (objective == MFT)
            lam = mi != y ? (t_m - t_y + threshold) / (1 + t_m - t_y)
                          : (t_y + threshold >= 1 ? 1 : threshold / rest);
        if (objective == LSSD) {
            float swapped = e[y];
            e[y] = e[mi];
            e[mi] = swapped;
        }

        float a = q_scale * (float)(1 - lam) / (float)se;
        double cross = 0;  /* sum e log p: exp(z' - m) for lssd, exp(z - m) otherwise */
        #pragma omp simd reduction(+:cross)
        for (int64_t j = 0; j < v; j++) {
            cross += e[j] * lp[j];
            g[j] -= a * e[j];
        }
        g[y] -= q_scale * (float)lam;

        double neg_entropy = sez / se - log(se), q_cross = cross / se;  /* sum t log t, sum q log p */
        double gap = (t_m - t_y) * ((double)lp[mi] - lp[y]);
        if (objective == LSSD) {
            kl[r] = neg_entropy - q_cross;
            kl_base[r] = kl[r] - gap;  /* KL(q || p) = KL(t || p) + (t_m - t_y)(log p_m - log p_y) */
        } else if (objective == KL) {
            kl[r] = kl_base[r] = neg_entropy - q_cross;
        } else {
            double q_y = (1 - lam) * t_y + lam;
            kl_base[r] = neg_entropy - q_cross;
            kl[r] = (1 - lam) * (neg_entropy - xlogx(t_y)) + rest * xlogx(1 - lam) + xlogx(q_y)
                    - ((1 - lam) * q_cross + lam * lp[y]);
        }
        top1[r] = mi;
    }
}

/* The teacher cache's top-k for one chunk of rows (teacher_cache.top_k_logprobs), from the
   teacher's logits z [rows, V] at temperature 1 (the caller divides by T), 0 < k < V: per row the
   k largest log-probabilities, most likely first (ties: lower index first), their ids, and
   log(1 - their mass) computed from the tail's own terms, so it is exact even when tiny.

   Eager PyTorch takes a logsumexp, a top-k (a partial sort, ~45 us a row of 8k here), a copy with
   the top-k masked and a second logsumexp: seven passes over a [chunk, V] tensor out of cache.
   Here each row is read three times while it is in L1/L2:
     pass 1  the maximum of each group of 16 logits (see GROUP), then a threshold t that at least
             k + 1 of those maxima reach, found by bisection over them
     pass 2  the logits >= t, looked for only in the groups whose maximum reaches t (typically
             k + 1 to k + 5 groups); their k + 1 largest go through a small heap: the top k, and
             the (k+1)-th, s, the tail's maximum
     pass 3  the sum over the tail of exp(z - s), in double: exp(min(z - s, 0)) over every
             logit, less 1 for each of the top k
   then log Z = max + log(sum_top exp(z - max) + exp(log tail - max)), a sum of positive terms.
   At V = 8k, k = 64: 12 us a row on one core here, against ~45 us for PyTorch's top-k alone.
   A NaN logit makes the row NaN, as it does the eager logsumexp. */
typedef struct { float v; int64_t i; } entry;

/* the heap's order: lower value first, and among equal values the higher index first, so the root
   is the entry a later, equal logit must not displace */
static inline int below(entry a, entry b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

static void sift_down(entry *h, int64_t n, int64_t p) {
    entry x = h[p];
    for (;;) {
        int64_t c = 2 * p + 1;
        if (c >= n) break;
        if (c + 1 < n && below(h[c + 1], h[c])) c++;
        if (!below(h[c], x)) break;
        h[p] = h[c];
        p = c;
    }
    h[p] = x;
}

/* the n largest of c[0..m) (in any order), by the order above, moved to c[0..n) in descending
   order */
static void top_n(entry *c, int64_t m, int64_t n) {
    for (int64_t p = n / 2 - 1; p >= 0; p--) sift_down(c, n, p);
    for (int64_t j = n; j < m; j++) {
        if (below(c[0], c[j])) {
            c[0] = c[j];
            sift_down(c, n, 0);
        }
    }
    for (int64_t last = n - 1; last > 0; last--) {  /* heap sort: the minimum goes last */
        entry x = c[0];
        c[0] = c[last];
        c[last] = x;
        sift_down(c, last, 0);
    }
}

/* The row is cut into 16 stretches of L = V / 16 logits (and a rest of V - 16 L < 16); group c
   is the c-th logit of every stretch, so the maxima of all groups are one vertical max over the
   stretches, no horizontal reduction. The rest is group L. */
#define GROUP 16

void teacher_top_k(const float *z, int64_t rows, int64_t v, int64_t k, float *values, int64_t *ids,
                   float *tail, entry *candidates, float *maxima, int threads) {
    const int64_t n = k + 1;  /* the top k and the tail's maximum */
    const int64_t L = v / GROUP, rest = v - GROUP * L, groups = L + (rest > 0);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * v;
        int thread = omp_get_thread_num();
        entry *h = candidates + (int64_t)thread * v;  /* [v] */
        float *gm = maxima + (int64_t)thread * (L + 1);  /* [L + 1] */

        /* group maxima, a NaN kept as the maximum (x > NaN is false) */
        #pragma omp simd
        for (int64_t c = 0; c < L; c++) gm[c] = zr[c];
        for (int64_t g = 1; g < GROUP; g++) {
            const float *stretch = zr + g * L;
            #pragma omp simd
            for (int64_t c = 0; c < L; c++)
                gm[c] = gm[c] != gm[c] || gm[c] >= stretch[c] ? gm[c] : stretch[c];
        }
        if (rest) {
            float m = zr[GROUP * L];
            for (int64_t j = GROUP * L + 1; j < v; j++) m = m != m || m >= zr[j] ? m : zr[j];
            gm[L] = m;
        }
        int nan = 0;
        #pragma omp simd reduction(|:nan)
        for (int64_t c = 0; c < groups; c++) nan |= gm[c] != gm[c];

        /* t: a threshold that at least n group maxima reach, so that at least n logits do and
           the n largest logits are all >= t, yet only a few more than n groups need a closer
           look. Bisection between the least and the largest maximum, counting the maxima that
           reach the middle in one vector pass each (a heap of the n largest maxima took a
           quarter of the kernel's time, in unpredictable branches; this, a few percent). */
        float t = -INFINITY;
        int64_t found = 0;
        if (!nan && groups > n) {
            float lo = INFINITY, hi = -INFINITY;  /* the least finite maximum, the largest */
            #pragma omp simd reduction(min:lo) reduction(max:hi)
            for (int64_t c = 0; c < groups; c++) {
                lo = gm[c] > -INFINITY && gm[c] < lo ? gm[c] : lo;
                hi = gm[c] > hi ? gm[c] : hi;
            }
            int64_t reach = 0;
            #pragma omp simd reduction(+:reach)
            for (int64_t c = 0; c < groups; c++) reach += gm[c] >= lo;
            if (reach >= n) {  /* else fewer than n finite maxima: t = -inf, every logit */
                for (int i = 0; i < 32 && reach > n + 4; i++) {
                    float mid = lo + (hi - lo) * 0.5f;
                    if (!(mid > lo && mid < hi)) break;  /* adjacent floats, or infinite */
                    int64_t m = 0;
                    #pragma omp simd reduction(+:m)
                    for (int64_t c = 0; c < groups; c++) m += gm[c] >= mid;
                    if (m >= n) {
                        lo = mid;
                        reach = m;
                    } else {
                        hi = mid;
                    }
                }
                t = lo;
            }
        }
        if (!nan && t > -INFINITY) {
            for (int64_t c = 0; c < L; c++)
                if (gm[c] >= t)
                    for (int64_t g = 0; g < GROUP; g++)
                        if (zr[g * L + c] >= t) h[found++] = (entry){zr[g * L + c], g * L + c};
            if (rest && gm[L] >= t)
                for (int64_t j = GROUP * L; j < v; j++)
                    if (zr[j] >= t) h[found++] = (entry){zr[j], j};
        } else if (!nan) {
            for (int64_t j = 0; j < v; j++) h[j] = (entry){zr[j], j};
            found = v;
        }
        if (nan) {
            for (int64_t i = 0; i < n; i++) h[i] = (entry){NAN, i};
        } else {
            top_n(h, found, n);  /* h[0..n) in descending order */
        }

        float s = h[k].v;  /* the tail's maximum */
        double log_tail = -INFINITY;  /* no tail mass when s is -inf */
        if (s != -INFINITY) {
            /* every logit adds exp(min(z - s, 0)): its tail term, or exactly 1 for each of the top
               k (those above s and the copies of s in the top k); min written without a compare,
               which would keep gcc from vectorising a loop that calls expf */
            double st = 0;
            #pragma omp simd reduction(+:st)
            for (int64_t j = 0; j < v; j++) {
                float d = zr[j] - s;
                st += expf((d - fabsf(d)) * 0.5f);
            }
            log_tail = s + log(st - (double)k);  /* the tail holds s itself: st - k >= 1 */
        }

        double max = h[0].v, sum = 0;
        for (int64_t i = 0; i < k; i++) sum += exp((double)h[i].v - max);
        double log_z = max + log(sum + exp(log_tail - max));
        if (nan) log_z = NAN;
        for (int64_t i = 0; i < k; i++) {
            values[r * k + i] = (float)(h[i].v - log_z);
            ids[r * k + i] = h[i].i;
        }
        tail[r] = (float)(log_tail - log_z);
    }
}
