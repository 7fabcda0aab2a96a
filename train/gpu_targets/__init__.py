"""Device descriptions (GpuTargetConfigProto text) of the GPUs ``atac-bench compile`` targets."""
