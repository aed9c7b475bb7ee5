/* The simulation's signals stay its own, and a bad Python on one rank fails init on every rank.
 *
 * Installs handlers (SIGTERM, SIGUSR2: flag setters; SIGUSR1: ignored; SIGINT: default) before
 * insitu_init, prints per rank and signal whether insitu_init changed its sigaction, then sends
 * steps; at step 2 every rank receives SIGTERM (sent to itself) and the loop ends when the
 * simulation's own handler has set its flag. Output lines: "<what> <value> <rank>". */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

#include "insitu.h"

static volatile sig_atomic_t terminated = 0;
static void on_term(int sig) { (void)sig; terminated = 1; }
static void on_usr2(int sig) { (void)sig; }

static const int sigs[] = {SIGTERM, SIGINT, SIGUSR1, SIGUSR2};
static const char *names[] = {"SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"};

static int same(const struct sigaction *a, const struct sigaction *b) {
    return a->sa_handler == b->sa_handler && a->sa_flags == b->sa_flags;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *run = argc > 1 ? argv[1] : NULL;

    struct sigaction act;
    memset(&act, 0, sizeof act);
    sigemptyset(&act.sa_mask);
    act.sa_handler = on_term;
    sigaction(SIGTERM, &act, NULL);
    act.sa_handler = on_usr2;
    act.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &act, NULL);
    act.sa_handler = SIG_IGN;
    act.sa_flags = 0;
    sigaction(SIGUSR1, &act, NULL);
    act.sa_handler = SIG_DFL;
    sigaction(SIGINT, &act, NULL);

    struct sigaction before[4], after[4];
    for (int i = 0; i < 4; i++) sigaction(sigs[i], NULL, &before[i]);

    const int64_t g[1] = {4 * size}, l[1] = {4}, start[1] = {4 * rank};
    const insitu_array_decl_t decl = {"u", INSITU_FLOAT64, 1, g, l, start};
    insitu_bridge_t *b = NULL;
    insitu_status_t s = insitu_init(MPI_COMM_WORLD, run, 1, &decl, &b);
    printf("init %s %d | %s\n", insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
    for (int i = 0; i < 4; i++) {
        sigaction(sigs[i], NULL, &after[i]);
        printf("sigaction-%s %s %d\n", names[i], same(&before[i], &after[i]) ? "kept" : "changed", rank);
    }
    fflush(stdout);

    double u[4];
    const int64_t mem[1] = {4}, s0[1] = {0}, cnt[1] = {4};
    int64_t step = 0;
    for (; step < 20 && !terminated; step++) {
        for (int i = 0; i < 4; i++) u[i] = (double)(1000 * step + 4 * rank + i);
        insitu_field_t f = {"u", u, INSITU_FLOAT64, INSITU_ORDER_C, 1, mem, s0, cnt, 4};
        s = insitu_send(b, step, 1, &f);
        if (s != INSITU_OK) printf("send %s %d | %s\n", insitu_status_name(s), rank, insitu_last_error());
        if (step == 2) kill(getpid(), SIGTERM); /* the simulation's handler must run, not Python's */
        int any = 0, flag = terminated;
        MPI_Allreduce(&flag, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        if (any) terminated = 1;
    }
    printf("terminated %d %d\n", (int)terminated, rank);
    printf("last_step %lld %d\n", (long long)(step - 1), rank);
    s = insitu_finalize(&b);
    printf("finalize %s %d | %s\n", insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
    for (int i = 0; i < 4; i++) {
        sigaction(sigs[i], NULL, &after[i]);
        printf("final-%s %s %d\n", names[i], same(&before[i], &after[i]) ? "kept" : "changed", rank);
    }
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
