/* The floor for load cost: a preload library that does nothing. */
int styxy_bench_empty_marker(void) { return 0; }
