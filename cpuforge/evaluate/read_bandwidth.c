/* The machine's memory read bandwidth: THREADS threads each sum their share of a buffer of MIB MiB (far
 * larger than the caches), ROUNDS times; prints the best round as JSON. Generation in llama.cpp reads every
 * weight once per token, so this is the bound its tokens/s x bytes per token is measured against.
 *
 *     read_bandwidth MIB THREADS ROUNDS
 *
 * Each thread writes its own share first (so the pages are its node's, and none is the shared zero page),
 * then every round starts and ends on a barrier: the round's time is the slowest thread's. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef struct {
    uint64_t *data;
    size_t count;
    int rounds;
    pthread_barrier_t *barrier;
    uint64_t sum;
} Share;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    for (; i < n; i++) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

static void *work(void *arg) {
    Share *s = arg;
    for (size_t i = 0; i < s->count; i++) s->data[i] = i ^ (uintptr_t)s;
    pthread_barrier_wait(s->barrier); /* written */
    for (int r = 0; r < s->rounds; r++) {
        pthread_barrier_wait(s->barrier); /* start */
        s->sum += sum(s->data, s->count);
        pthread_barrier_wait(s->barrier); /* end */
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MIB THREADS ROUNDS\n", argv[0]);
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    int threads = atoi(argv[2]), rounds = atoi(argv[3]);
    if (mib < 1 || threads < 1 || rounds < 1) {
        fprintf(stderr, "%s: MIB, THREADS and ROUNDS must be positive\n", argv[0]);
        return 2;
    }
    size_t count = (mib << 20) / sizeof(uint64_t), per = count / threads / 8 * 8;
    uint64_t *data = aligned_alloc(64, count * sizeof(uint64_t));
    Share *shares = calloc(threads, sizeof(Share));
    pthread_t *ids = calloc(threads, sizeof(pthread_t));
    if (!data || !shares || !ids) {
        fprintf(stderr, "%s: cannot allocate %zu MiB\n", argv[0], mib);
        return 1;
    }
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, threads + 1);
    for (int t = 0; t < threads; t++) {
        shares[t] = (Share){data + t * per, per, rounds, &barrier, 0};
        pthread_create(&ids[t], NULL, work, &shares[t]);
    }
    pthread_barrier_wait(&barrier);
    double best = 0;
    printf("{\"mib\": %zu, \"threads\": %d, \"rounds_gbps\": [", mib, threads);
    for (int r = 0; r < rounds; r++) {
        pthread_barrier_wait(&barrier);
        double start = now();
        pthread_barrier_wait(&barrier);
        double gbps = threads * per * sizeof(uint64_t) / (now() - start) / 1e9;
        printf("%s%.3f", r ? ", " : "", gbps);
        if (gbps > best) best = gbps;
    }
    uint64_t total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        total += shares[t].sum;
    }
    /* the sums printed, so no compiler can drop the reads */
    printf("], \"best_gbps\": %.3f, \"checksum\": %llu}\n", best, (unsigned long long)total);
    return 0;
}
