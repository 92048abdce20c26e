// Benchmark fixture: a Go program that ends at once (statically linked, as Go builds a
// program without cgo): the cost of starting one under the seccomp supervisor.
package main

func main() {}
