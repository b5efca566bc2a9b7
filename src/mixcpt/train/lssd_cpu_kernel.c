/* The LSSD target's vocabulary-wide work for one chunk of positions, fused, on the CPU
   (fused_loss.SwappedTeacher.chunk; design.md §1). Built and loaded by lssd_cpu_kernel.py.

   For each row r of a chunk (one supervised position), with z the teacher's logits [V], y the label,
   m the first index of z's maximum, q = softmax(z) and q' = q with q[y] and q[m] exchanged (the logit
   swap permutes the row, so its softmax is q permuted), and log p the student's log-softmax [V]:

       grad[r] -= q_scale * q'                     (grad holds the student's p on entry)
       kl[r]    = KL(q' || p) = sum q log q - sum q' log p,  with  sum q log q = sum q (z - m) - log sum exp(z - m)
       top1[r]  = m

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

void lssd_swapped_target(const float *z, const float *log_p, float *grad, const int64_t *labels,
                         int64_t rows, int64_t v, float q_scale, float *scratch, double *kl, int64_t *top1,
                         int threads) {
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
        float swapped = e[y];
        e[y] = e[mi];
        e[mi] = swapped;

        float a = q_scale / (float)se;
        double cross = 0;  /* sum exp(z' - m) log p */
        #pragma omp simd reduction(+:cross)
        for (int64_t j = 0; j < v; j++) {
            cross += e[j] * lp[j];
            g[j] -= a * e[j];
        }
        kl[r] = (sez - cross) / se - log(se);
        top1[r] = mi;
    }
}
