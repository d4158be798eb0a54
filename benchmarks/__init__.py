"""fastbert's benchmarks."""
