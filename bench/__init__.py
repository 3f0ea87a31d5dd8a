"""bench/ as a package, so the suite and its tests import bench.gpu_parts."""
