"""What the tests, the benchmarks and the GPU check share, imported normally and by nothing else
in the package: the oracles (the published wrapper and the authors' SyncControlNet, restated
literally), measurement helpers with the real architectures' configs, and the Cog server harness."""
